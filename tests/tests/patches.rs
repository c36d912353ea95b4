//! The patch pipeline: every patch in patches/ applies, in order, to a pristine copy of
//! the pinned tree; a patch that does not apply fails by name.

use std::fs;

use expertd::engine::tree::{TreeError, apply_patches, list_patches, sync_tree};
use expertd_tests::workspace;

fn pristine_copy() -> tempfile::TempDir {
    let vendor = workspace().join("vendor/llama.cpp");
    assert!(
        vendor.join("CMakeLists.txt").is_file(),
        "{} is missing: run vendor/fetch.sh",
        vendor.display()
    );
    let dir = tempfile::tempdir().unwrap();
    sync_tree(&vendor, dir.path()).unwrap();
    dir
}

#[test]
fn all_patches_apply_to_the_pristine_tree() {
    let patches = list_patches(&workspace().join("patches")).unwrap();
    assert!(!patches.is_empty(), "patches/ holds no NNNN-*.patch");
    let tree = pristine_copy();
    apply_patches(tree.path(), &patches).unwrap();
    // Patch 0001 links the pool and prints its version.
    let server = fs::read_to_string(tree.path().join("tools/server/server.cpp")).unwrap();
    assert!(server.contains("expert_pool_version()"));
    assert!(tree.path().join("cmake/expertd.cmake").is_file());
}

#[test]
fn a_patch_that_does_not_apply_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = workspace().join("patches/0001-link-expert-pool.patch");
    fs::copy(&good, dir.path().join("0001-link-expert-pool.patch")).unwrap();
    // A hunk whose removed line is not in the tree.
    let broken = "--- a/src/CMakeLists.txt\n+++ b/src/CMakeLists.txt\n@@ -1,1 +1,1 @@\n\
                  -this line is not in upstream\n+replacement\n";
    fs::write(dir.path().join("0002-broken.patch"), broken).unwrap();

    let tree = pristine_copy();
    let list = list_patches(dir.path()).unwrap();
    let err = apply_patches(tree.path(), &list).unwrap_err();
    match err {
        TreeError::PatchDoesNotApply { name, output } => {
            assert_eq!(name, "0002-broken.patch");
            assert!(output.contains("src/CMakeLists.txt"), "{output}");
        }
        other => panic!("unexpected error: {other}"),
    }
    // The good patch before it did apply.
    assert!(tree.path().join("cmake/expertd.cmake").is_file());
}
