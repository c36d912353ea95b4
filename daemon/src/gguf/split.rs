//! Models split over several GGUF files, as llama.cpp's `gguf-split` writes them and its
//! loader reads them: `NAME-00001-of-00003.gguf` to `NAME-00003-of-00003.gguf`, each with
//! `split.no` (0-based), `split.count` and `split.tensors.count` (the tensors of all the
//! files). The first file holds the model's metadata; every file holds its own tensors.
//! The engine is given the first file and finds the others by name, so the daemon does
//! the same: a model's size, experts and layers are those of all its files.

// Never panic on any input: no indexing, unwrap, panics or unchecked arithmetic.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{ALIGNMENT_KEY, GgufError, GgufFile, TensorSpec, Value, WriteError};

/// 0-based index of this file among the splits (u16).
pub const SPLIT_NO_KEY: &str = "split.no";
/// How many files the model is split into (u16).
pub const SPLIT_COUNT_KEY: &str = "split.count";
/// Tensors in all the files together (i32).
pub const SPLIT_TENSORS_KEY: &str = "split.tensors.count";

/// Where a file sits in a split model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitInfo {
    /// 0-based index of the file.
    pub no: u16,
    /// Number of files (at least 2).
    pub count: u16,
    /// Tensors in all the files.
    pub tensors: u64,
}

/// The file's place in a split model, or None when it is a whole model (no
/// `split.count`, or a count of 0 or 1, as llama.cpp reads it). The keys must have
/// llama.cpp's types (u16, u16, i32): the engine refuses a file with any other.
pub fn split_info(file: &GgufFile) -> Result<Option<SplitInfo>, GgufError> {
    let bad = |key: &str, reason: String| GgufError::BadKey {
        path: file.path.clone(),
        key: key.to_string(),
        reason,
    };
    let u16_key = |key: &str| -> Result<Option<u16>, GgufError> {
        match file.get(key) {
            None => Ok(None),
            Some(Value::U16(v)) => Ok(Some(*v)),
            Some(v) => Err(bad(
                key,
                format!(
                    "expected u16, found {} {v:?} (llama.cpp refuses any other type)",
                    v.type_name()
                ),
            )),
        }
    };
    let count = match u16_key(SPLIT_COUNT_KEY)? {
        None | Some(0 | 1) => return Ok(None),
        Some(c) => c,
    };
    let no = u16_key(SPLIT_NO_KEY)?.ok_or_else(|| GgufError::MissingKey {
        path: file.path.clone(),
        key: SPLIT_NO_KEY.into(),
        why: "a file of a split model says which split it is",
    })?;
    if no >= count {
        return Err(bad(
            SPLIT_NO_KEY,
            format!("split {no} (0-based) of {count} is out of range"),
        ));
    }
    let tensors = match file.get(SPLIT_TENSORS_KEY) {
        None => {
            return Err(GgufError::MissingKey {
                path: file.path.clone(),
                key: SPLIT_TENSORS_KEY.into(),
                why: "a split model says how many tensors its files hold",
            });
        }
        Some(Value::I32(v)) => {
            u64::try_from(*v).map_err(|_| bad(SPLIT_TENSORS_KEY, format!("{v} is negative")))?
        }
        Some(v) => {
            return Err(bad(
                SPLIT_TENSORS_KEY,
                format!(
                    "expected i32, found {} {v:?} (llama.cpp refuses any other type)",
                    v.type_name()
                ),
            ));
        }
    };
    Ok(Some(SplitInfo { no, count, tensors }))
}

/// The paths of every split, in order, from the path of split `info.no`: llama.cpp's
/// naming, `PREFIX-NNNNN-of-MMMMM.gguf` with 1-based, five-digit numbers (PREFIX is the
/// rest of the path, as llama.cpp takes it).
pub fn split_paths(path: &Path, info: SplitInfo) -> Result<Vec<PathBuf>, GgufError> {
    let suffix = format!(
        "-{:05}-of-{:05}.gguf",
        u32::from(info.no).saturating_add(1),
        info.count
    );
    let prefix = path
        .to_str()
        .and_then(|p| p.strip_suffix(&suffix))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| GgufError::SplitName {
            path: path.to_path_buf(),
            no: u32::from(info.no).saturating_add(1),
            count: info.count,
            suffix: suffix.clone(),
        })?;
    Ok(paths_of(prefix, info.count))
}

/// `PREFIX-00001-of-0000N.gguf` to `PREFIX-0000N-of-0000N.gguf`.
fn paths_of(prefix: &str, count: u16) -> Vec<PathBuf> {
    (1..=count)
        .map(|i| PathBuf::from(format!("{prefix}-{i:05}-of-{count:05}.gguf")))
        .collect()
}

/// Every split's path when `path` has llama.cpp's split form (`PREFIX-NNNNN-of-MMMMM.gguf`,
/// 1 <= NNNNN <= MMMMM, 2 <= MMMMM <= 65535), from the name alone; None otherwise. For
/// watching the files of a model that cannot be read yet.
pub fn split_paths_by_name(path: &Path) -> Option<Vec<PathBuf>> {
    let whole = path.to_str()?.strip_suffix(".gguf")?;
    // "-NNNNN-of-MMMMM": 15 ASCII bytes at the end
    let cut = whole.len().checked_sub(15)?;
    let (prefix, tail) = (whole.get(..cut)?, whole.get(cut..)?);
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    let no = tail.strip_prefix('-')?.get(..5).filter(|s| digits(s))?;
    let count = tail.get(6..)?.strip_prefix("-of-").filter(|s| digits(s))?;
    let (no, count): (u32, u32) = (no.parse().ok()?, count.parse().ok()?);
    let count = u16::try_from(count).ok()?;
    if prefix.is_empty() || count < 2 || no == 0 || no > u32::from(count) {
        return None;
    }
    Some(paths_of(prefix, count))
}

/// A model's GGUF headers: one file, or every split of a split model in order.
#[derive(Clone, Debug)]
pub struct GgufModel {
    first: GgufFile,
    rest: Vec<GgufFile>,
}

impl GgufModel {
    /// Reads the header of the model at `path` and, when it is the first split of a split
    /// model, the headers of the other splits. Errors name the file and the reason: a
    /// later split given instead of the first, a name that does not lead to the others, a
    /// missing split, one that belongs to another model (wrong index or count), a tensor in
    /// two splits, a tensor count that does not add up.
    pub fn open(path: &Path) -> Result<GgufModel, GgufError> {
        let first = GgufFile::open(path)?;
        let Some(info) = split_info(&first)? else {
            return Ok(GgufModel {
                first,
                rest: Vec::new(),
            });
        };
        let count = info.count;
        if info.no != 0 {
            return Err(GgufError::SplitNotFirst {
                path: path.to_path_buf(),
                no: u32::from(info.no).saturating_add(1),
                count,
                first: split_paths(path, info)
                    .ok()
                    .and_then(|v| v.into_iter().next()),
            });
        }
        let paths = split_paths(path, info)?;
        let mut names: HashSet<String> = first.tensors.iter().map(|t| t.name.clone()).collect();
        let mut rest = Vec::new();
        for (i, p) in paths.iter().enumerate().skip(1) {
            let no = u32::try_from(i).unwrap_or(u32::MAX).saturating_add(1);
            let file = GgufFile::open(p).map_err(|e| match e {
                GgufError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
                    GgufError::SplitMissing {
                        path,
                        no,
                        count,
                        first: first.path.clone(),
                    }
                }
                e => e,
            })?;
            let mismatch = |found: String| GgufError::SplitMismatch {
                path: p.clone(),
                found,
                no,
                count,
            };
            match split_info(&file)? {
                Some(s) if usize::from(s.no) == i && s.count == count => {}
                Some(s) => {
                    return Err(mismatch(format!(
                        "says it is split {} of {}",
                        u32::from(s.no).saturating_add(1),
                        s.count
                    )));
                }
                None => {
                    return Err(mismatch(format!(
                        "has no {SPLIT_COUNT_KEY} above 1: a whole model, not a split"
                    )));
                }
            }
            if let Some(t) = file.tensors.iter().find(|t| !names.insert(t.name.clone())) {
                return Err(GgufError::SplitDuplicateTensor {
                    path: p.clone(),
                    name: t.name.clone(),
                });
            }
            rest.push(file);
        }
        let held = names.len() as u64;
        if held != info.tensors {
            return Err(GgufError::SplitTensorCount {
                path: path.to_path_buf(),
                expected: info.tensors,
                found: held,
                count,
            });
        }
        Ok(GgufModel { first, rest })
    }

    /// The file the model's metadata is in (the first split).
    pub fn first(&self) -> &GgufFile {
        &self.first
    }

    /// Every file, the first one first.
    pub fn files(&self) -> impl Iterator<Item = &GgufFile> {
        std::iter::once(&self.first).chain(self.rest.iter())
    }

    /// The paths of every file, the first one first.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files().map(|f| f.path.clone()).collect()
    }

    /// Bytes of all the files together.
    pub fn file_size(&self) -> u64 {
        self.files()
            .fold(0u64, |sum, f| sum.saturating_add(f.file_size))
    }
}

/// Why [`write_split`] could not split a model.
#[derive(Debug, thiserror::Error)]
pub enum SplitWriteError {
    /// The input's header.
    #[error(transparent)]
    Read(#[from] GgufError),
    /// A split's header.
    #[error("{path}: laying out the split: {source}")]
    Layout {
        /// The split.
        path: PathBuf,
        /// Why.
        source: WriteError,
    },
    /// Reading the input or writing a split.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The request cannot be met (count, file name, an input that is split already).
    #[error("{path}: {reason}")]
    Invalid {
        /// The input.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Splits the model at `input` (`NAME.gguf`) into `count` files next to it,
/// `NAME-00001-of-0000N.gguf` and so on, the way llama.cpp's `gguf-split` does: tensors in
/// file order, in `count` runs of about equal bytes; all metadata in the first file (any
/// `split.*` keys of the input replaced), the `split.*` keys (and the alignment) in every
/// file. Each file is written to a temp file and renamed into place; on an error the
/// splits already written are removed. Returns the paths, the first one first.
pub fn write_split(input: &Path, count: u16) -> Result<Vec<PathBuf>, SplitWriteError> {
    let invalid = |reason: String| SplitWriteError::Invalid {
        path: input.to_path_buf(),
        reason,
    };
    let src = GgufFile::open(input)?;
    if split_info(&src)?.is_some() {
        return Err(invalid("already a split file".into()));
    }
    let n_tensors = src.tensors.len();
    if count < 2 || usize::from(count) > n_tensors {
        return Err(invalid(format!(
            "cannot split {n_tensors} tensors into {count} files (2..={n_tensors})"
        )));
    }
    let stem = input
        .to_str()
        .map(|n| n.strip_suffix(".gguf").unwrap_or(n))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("not a UTF-8 file path".into()))?;
    let paths = split_paths(
        Path::new(&format!("{stem}-00001-of-{count:05}.gguf")),
        SplitInfo {
            no: 0,
            count,
            tensors: n_tensors as u64,
        },
    )?;
    let mut written = Vec::new();
    let result = write_splits(&src, &group_tensors(&src, count), &paths, &mut written);
    if result.is_err() {
        for p in &written {
            let _ = std::fs::remove_file(p);
        }
    }
    result.map(|()| paths)
}

/// The tensors of `src` in `count` runs in file order of about equal bytes, each at least
/// one tensor (`count` <= the number of tensors).
fn group_tensors(src: &GgufFile, count: u16) -> Vec<Vec<&super::TensorInfo>> {
    let n_tensors = src.tensors.len();
    let total = src.tensor_bytes();
    let last_group = usize::from(count).saturating_sub(1);
    let mut groups: Vec<Vec<&super::TensorInfo>> = vec![Vec::new(); usize::from(count)];
    let mut acc: u64 = 0;
    let mut g: usize = 0;
    for (i, t) in src.tensors.iter().enumerate() {
        // Move on once this run has its share, or when the remaining tensors are needed
        // to give every later run one.
        let share = u128::from(total)
            .saturating_mul((g as u128).saturating_add(1))
            .checked_div(u128::from(count))
            .unwrap_or(0);
        let must_move = n_tensors.saturating_sub(i) <= last_group.saturating_sub(g);
        let group_has = groups.get(g).is_some_and(|v| !v.is_empty());
        if g < last_group && group_has && (u128::from(acc) >= share || must_move) {
            g = g.saturating_add(1);
        }
        if let Some(v) = groups.get_mut(g) {
            v.push(t);
        }
        acc = acc.saturating_add(t.size);
    }
    groups
}

/// Writes split `no` of `groups` to `paths[no]` for every group, pushing each path to
/// `written` once it is in place.
fn write_splits(
    src: &GgufFile,
    groups: &[Vec<&super::TensorInfo>],
    paths: &[PathBuf],
    written: &mut Vec<PathBuf>,
) -> Result<(), SplitWriteError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SplitWriteError::Io { path, source }
    };
    let src_file = File::open(&src.path).map_err(io(&src.path))?;
    let count = u16::try_from(groups.len()).unwrap_or(u16::MAX);
    let n_tensors = i32::try_from(src.tensors.len()).unwrap_or(i32::MAX);
    let mut buf = vec![0u8; 1 << 20];
    for (no, (group, path)) in groups.iter().zip(paths).enumerate() {
        let no = u16::try_from(no).unwrap_or(u16::MAX);
        let is_split_key = |k: &str| k.starts_with("split.");
        let mut md: Vec<(String, Value)> = src
            .metadata
            .iter()
            .filter(|(k, _)| !is_split_key(k) && (no == 0 || k.as_str() == ALIGNMENT_KEY))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        md.extend([
            (SPLIT_NO_KEY.to_string(), Value::U16(no)),
            (SPLIT_COUNT_KEY.to_string(), Value::U16(count)),
            (SPLIT_TENSORS_KEY.to_string(), Value::I32(n_tensors)),
        ]);
        let specs: Vec<TensorSpec> = group.iter().map(|&t| TensorSpec::from(t)).collect();
        let lay = super::layout(&md, &specs).map_err(|source| SplitWriteError::Layout {
            path: path.clone(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
        let out = tmp.as_file();
        out.set_len(lay.file_size).map_err(io(path))?;
        out.write_all_at(&lay.header, 0).map_err(io(path))?;
        for (from, to) in group.iter().zip(&lay.tensors) {
            let src_at = src.absolute_offset(from);
            let dst_at = lay.data_offset.saturating_add(to.offset);
            let mut done: u64 = 0;
            while done < from.size {
                let n = usize::try_from(from.size.saturating_sub(done))
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let chunk = buf.get_mut(..n).unwrap_or_default();
                src_file
                    .read_exact_at(chunk, src_at.saturating_add(done))
                    .map_err(io(&src.path))?;
                out.write_all_at(chunk, dst_at.saturating_add(done))
                    .map_err(io(path))?;
                done = done.saturating_add(n as u64);
            }
        }
        out.sync_all().map_err(io(path))?;
        tmp.persist(path).map_err(|e| SplitWriteError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        written.push(path.clone());
    }
    Ok(())
}
