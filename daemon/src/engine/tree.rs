//! Source trees for the engine build: the ordered patch list, applying it to a pristine
//! copy, and syncing the result into the build's source directory so that only files whose
//! content changed get a new mtime (the build stays incremental and never goes stale).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Why a source tree could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("patch {name} does not apply to the pinned llama.cpp tree:\n{output}")]
    PatchDoesNotApply { name: String, output: String },
    #[error("could not run git to apply patches ({source}); install git (apt-get install git)")]
    GitMissing { source: io::Error },
    #[error(
        "patch file name {name} does not start with a 4-digit number and a dash (NNNN-name.patch)"
    )]
    BadPatchName { name: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The patches in `dir`, in the order they apply: every `NNNN-*.patch`, sorted by name.
pub fn list_patches(dir: &Path) -> Result<Vec<PathBuf>, TreeError> {
    let mut patches = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".patch") {
            continue;
        }
        let numbered = name.len() > 5
            && name.as_bytes()[..4].iter().all(u8::is_ascii_digit)
            && name.as_bytes()[4] == b'-';
        if !numbered {
            return Err(TreeError::BadPatchName {
                name: name.to_string(),
            });
        }
        patches.push(path);
    }
    patches.sort();
    Ok(patches)
}

/// A digest of everything that determines a source tree: the pin and the patches (names
/// and contents). The build re-prepares its tree when this changes.
pub fn source_stamp(pin_file: &Path, patches: &[PathBuf]) -> Result<String, TreeError> {
    let mut hasher = Sha256::new();
    hasher.update(fs::read(pin_file).map_err(io_err(pin_file))?);
    for patch in patches {
        hasher.update(
            patch
                .file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        hasher.update([0]);
        hasher.update(fs::read(patch).map_err(io_err(patch))?);
        hasher.update([0]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Applies `patches` in order to the tree at `tree`, each all-or-nothing (`git apply`).
/// Stops at the first patch that does not apply and names it.
pub fn apply_patches(tree: &Path, patches: &[PathBuf]) -> Result<(), TreeError> {
    for patch in patches {
        let name = patch
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let output = git_apply(tree, patch)?;
        if !output.status.success() {
            let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stdout));
            return Err(TreeError::PatchDoesNotApply {
                name,
                output: text.trim_end().to_string(),
            });
        }
    }
    Ok(())
}

fn git_apply(tree: &Path, patch: &Path) -> Result<std::process::Output, TreeError> {
    // The tree usually sits inside the expertd repository (under target/). Inside a
    // repository `git apply` takes paths relative to the repository's top and silently
    // skips the rest, so stop git from looking above the tree: it then acts like `patch`.
    let ceiling = tree.parent().unwrap_or(tree);
    Command::new("git")
        .arg("apply")
        .arg("--whitespace=nowarn")
        .arg(patch)
        .current_dir(tree)
        .env("GIT_CEILING_DIRECTORIES", ceiling)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .output()
        .map_err(|source| TreeError::GitMissing { source })
}

/// Makes the tree at `to` hold exactly what the tree at `from` holds. Files whose content
/// is already equal are left untouched (their mtimes too); others are rewritten; entries
/// only in `to` are removed. Returns how many files were written.
pub fn sync_tree(from: &Path, to: &Path) -> Result<usize, TreeError> {
    fs::create_dir_all(to).map_err(io_err(to))?;
    let mut written = 0;
    sync_dir(from, to, &mut written)?;
    Ok(written)
}

fn sync_dir(from: &Path, to: &Path, written: &mut usize) -> Result<(), TreeError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(from).map_err(io_err(from))? {
        let entry = entry.map_err(io_err(from))?;
        let name = entry.file_name();
        let src = entry.path();
        let dst = to.join(&name);
        let kind = entry.file_type().map_err(io_err(&src))?;
        if kind.is_dir() {
            if dst.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
                fs::remove_file(&dst).map_err(io_err(&dst))?;
            }
            fs::create_dir_all(&dst).map_err(io_err(&dst))?;
            sync_dir(&src, &dst, written)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&src).map_err(io_err(&src))?;
            if fs::read_link(&dst).ok().as_ref() != Some(&target) {
                remove_any(&dst)?;
                std::os::unix::fs::symlink(&target, &dst).map_err(io_err(&dst))?;
                *written += 1;
            }
        } else {
            if sync_file(&src, &dst)? {
                *written += 1;
            }
        }
        names.push(name);
    }
    for entry in fs::read_dir(to).map_err(io_err(to))? {
        let entry = entry.map_err(io_err(to))?;
        if !names.contains(&entry.file_name()) {
            remove_any(&entry.path())?;
        }
    }
    Ok(())
}

/// Copies `src` over `dst` unless their contents and permissions are already equal.
fn sync_file(src: &Path, dst: &Path) -> Result<bool, TreeError> {
    let src_meta = fs::metadata(src).map_err(io_err(src))?;
    if let Ok(dst_meta) = dst.symlink_metadata() {
        if dst_meta.is_file()
            && dst_meta.len() == src_meta.len()
            && dst_meta.permissions() == src_meta.permissions()
            && fs::read(src).map_err(io_err(src))? == fs::read(dst).map_err(io_err(dst))?
        {
            return Ok(false);
        }
        remove_any(dst)?;
    }
    fs::copy(src, dst).map_err(io_err(dst))?;
    Ok(true)
}

fn remove_any(path: &Path) -> Result<(), TreeError> {
    match path.symlink_metadata() {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).map_err(io_err(path)),
        Ok(_) => fs::remove_file(path).map_err(io_err(path)),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn sync_rewrites_only_changed_files_and_removes_extras() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write(&a.join("same.txt"), "same");
        write(&a.join("sub/changed.txt"), "new");
        write(&b.join("same.txt"), "same");
        write(&b.join("sub/changed.txt"), "old");
        write(&b.join("extra/gone.txt"), "x");
        let before = fs::metadata(b.join("same.txt"))
            .unwrap()
            .modified()
            .unwrap();

        assert_eq!(sync_tree(&a, &b).unwrap(), 1);
        assert_eq!(
            fs::read_to_string(b.join("sub/changed.txt")).unwrap(),
            "new"
        );
        assert!(!b.join("extra").exists());
        let after = fs::metadata(b.join("same.txt"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after, "an unchanged file must keep its mtime");
        assert_eq!(sync_tree(&a, &b).unwrap(), 0);
    }

    #[test]
    fn patches_apply_in_order_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        write(&tree.join("f.txt"), "one\n");
        let patches = dir.path().join("patches");
        write(
            &patches.join("0001-first.patch"),
            "--- a/f.txt\n+++ b/f.txt\n@@ -1 +1 @@\n-one\n+two\n",
        );
        write(
            &patches.join("0002-second.patch"),
            "--- a/f.txt\n+++ b/f.txt\n@@ -1 +1 @@\n-two\n+three\n",
        );
        let list = list_patches(&patches).unwrap();
        apply_patches(&tree, &list).unwrap();
        assert_eq!(fs::read_to_string(tree.join("f.txt")).unwrap(), "three\n");

        // Applying again fails on the first patch, which no longer matches.
        let err = apply_patches(&tree, &list).unwrap_err();
        assert!(
            matches!(&err, TreeError::PatchDoesNotApply { name, .. } if name == "0001-first.patch"),
            "{err}"
        );
    }

    #[test]
    fn unnumbered_patch_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("fix.patch"), "");
        assert!(matches!(
            list_patches(dir.path()),
            Err(TreeError::BadPatchName { .. })
        ));
    }
}
