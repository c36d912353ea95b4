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
/// `split.count`, or a count of 0 or 1, as llama.cpp reads it).
pub fn split_info(file: &GgufFile) -> Result<Option<SplitInfo>, GgufError> {
    let bad = |key: &str, reason: String| GgufError::BadKey {
        path: file.path.clone(),
        key: key.to_string(),
        reason,
    };
    let u16_key = |key: &str| -> Result<Option<u16>, GgufError> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| u16::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| {
                    bad(
                        key,
                        format!(
                            "expected an integer in 0..=65535, found {} {v:?}",
                            v.type_name()
                        ),
                    )
                }),
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
        Some(v) => v.as_u64().ok_or_else(|| {
            bad(
                SPLIT_TENSORS_KEY,
                format!(
                    "expected a non-negative integer, found {} {v:?}",
                    v.type_name()
                ),
            )
        })?,
    };
    Ok(Some(SplitInfo { no, count, tensors }))
}

/// The paths of every split, in order, from the path of split `info.no`: llama.cpp's
/// naming, `PREFIX-NNNNN-of-MMMMM.gguf` with 1-based, five-digit numbers.
pub fn split_paths(path: &Path, info: SplitInfo) -> Result<Vec<PathBuf>, GgufError> {
    let suffix = format!(
        "-{:05}-of-{:05}.gguf",
        u32::from(info.no).saturating_add(1),
        info.count
    );
    let prefix = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(&suffix))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| GgufError::BadSplit {
            path: path.to_path_buf(),
            reason: format!(
                "the file is split {} of {}, but its name does not end in '{suffix}', so the \
                 other splits cannot be found (llama.cpp names them PREFIX-NNNNN-of-MMMMM.gguf)",
                u32::from(info.no).saturating_add(1),
                info.count
            ),
        })?;
    Ok((1..=u32::from(info.count))
        .map(|i| path.with_file_name(format!("{prefix}-{i:05}-of-{:05}.gguf", info.count)))
        .collect())
}

/// Every split's path when `path`'s name has llama.cpp's split form
/// (`PREFIX-NNNNN-of-MMMMM.gguf`, 1 <= NNNNN <= MMMMM, MMMMM >= 2), from the name alone; None
/// otherwise. For watching the files of a model that cannot be read yet.
pub fn split_paths_by_name(path: &Path) -> Option<Vec<PathBuf>> {
    let name = path.file_name()?.to_str()?.strip_suffix(".gguf")?;
    // "-NNNNN-of-MMMMM": 15 ASCII bytes at the end
    let cut = name.len().checked_sub(15)?;
    let (prefix, tail) = (name.get(..cut)?, name.get(cut..)?);
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    let no = tail.strip_prefix('-')?.get(..5).filter(|s| digits(s))?;
    let count = tail.get(6..)?.strip_prefix("-of-").filter(|s| digits(s))?;
    let (no, count): (u32, u32) = (no.parse().ok()?, count.parse().ok()?);
    if prefix.is_empty() || count < 2 || no == 0 || no > count {
        return None;
    }
    Some(
        (1..=count)
            .map(|i| path.with_file_name(format!("{prefix}-{i:05}-of-{count:05}.gguf")))
            .collect(),
    )
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
    /// later split given instead of the first, a missing split, one that belongs to another
    /// model (wrong index or count), a tensor in two splits, a tensor count that does not
    /// add up.
    pub fn open(path: &Path) -> Result<GgufModel, GgufError> {
        let first = GgufFile::open(path)?;
        let Some(info) = split_info(&first)? else {
            return Ok(GgufModel {
                first,
                rest: Vec::new(),
            });
        };
        let paths = split_paths(path, info)?;
        let count = info.count;
        if info.no != 0 {
            let first_path = paths.first().map_or_else(String::new, |p| {
                format!(": give the first one, {}", p.display())
            });
            return Err(GgufError::BadSplit {
                path: path.to_path_buf(),
                reason: format!(
                    "this is split {} of {count}; a split model is opened from its first \
                     split{first_path}",
                    u32::from(info.no).saturating_add(1)
                ),
            });
        }
        let mut names: HashSet<String> = first.tensors.iter().map(|t| t.name.clone()).collect();
        let mut rest = Vec::new();
        for (i, p) in paths.iter().enumerate().skip(1) {
            let file = GgufFile::open(p).map_err(|e| match e {
                GgufError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
                    GgufError::BadSplit {
                        path,
                        reason: format!(
                            "missing: split {} of {count} of {}",
                            i.saturating_add(1),
                            first.path.display()
                        ),
                    }
                }
                e => e,
            })?;
            let expected = format!("split {} of {count}", i.saturating_add(1));
            match split_info(&file)? {
                Some(s) if usize::from(s.no) == i && s.count == count => {}
                Some(s) => {
                    return Err(GgufError::BadSplit {
                        path: p.clone(),
                        reason: format!(
                            "says it is split {} of {}, expected {expected}: it belongs to another \
                             model",
                            u32::from(s.no).saturating_add(1),
                            s.count
                        ),
                    });
                }
                None => {
                    return Err(GgufError::BadSplit {
                        path: p.clone(),
                        reason: format!(
                            "has no {SPLIT_COUNT_KEY} key, expected {expected}: not a split file"
                        ),
                    });
                }
            }
            if let Some(t) = file.tensors.iter().find(|t| !names.insert(t.name.clone())) {
                return Err(GgufError::BadSplit {
                    path: p.clone(),
                    reason: format!("tensor '{}' is also in an earlier split", t.name),
                });
            }
            rest.push(file);
        }
        let held = names.len() as u64;
        if held != info.tensors {
            return Err(GgufError::BadSplit {
                path: path.to_path_buf(),
                reason: format!(
                    "{SPLIT_TENSORS_KEY} is {} but the {count} splits hold {held} tensors",
                    info.tensors
                ),
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
    #[error("laying out a split: {0}")]
    Layout(#[from] WriteError),
    /// Reading the input or writing a split.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The request cannot be met (count, file name, an input that is split already).
    #[error("{0}")]
    Invalid(String),
}

/// Splits the model at `input` (`NAME.gguf`) into `count` files next to it,
/// `NAME-00001-of-0000N.gguf` and so on, the way llama.cpp's `gguf-split` does: tensors in
/// file order, in `count` runs of about equal bytes; all metadata in the first file, the
/// `split.*` keys (and the alignment) in every file. Each file is written to a temp file
/// and renamed into place. Returns the paths, the first one first.
pub fn write_split(input: &Path, count: u16) -> Result<Vec<PathBuf>, SplitWriteError> {
    let src = GgufFile::open(input)?;
    if split_info(&src)?.is_some() {
        return Err(SplitWriteError::Invalid(format!(
            "{} is already a split file",
            input.display()
        )));
    }
    let n_tensors = src.tensors.len();
    if count < 2 || usize::from(count) > n_tensors {
        return Err(SplitWriteError::Invalid(format!(
            "cannot split {n_tensors} tensors into {count} files (2..={n_tensors})"
        )));
    }
    let stem = input
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_suffix(".gguf").unwrap_or(n))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| SplitWriteError::Invalid(format!("{}: not a file name", input.display())))?;

    // Runs of about total / count bytes, each at least one tensor.
    let total = src.tensor_bytes();
    let mut groups: Vec<Vec<&super::TensorInfo>> = vec![Vec::new(); usize::from(count)];
    let mut acc: u64 = 0;
    let mut g: usize = 0;
    for (i, t) in src.tensors.iter().enumerate() {
        let last_group = usize::from(count).saturating_sub(1);
        // Move on once this run has its share, or when the remaining tensors are needed
        // to give every later run one.
        let share = u128::from(total)
            .saturating_mul((g as u128).saturating_add(1))
            .checked_div(u128::from(count))
            .unwrap_or(0);
        let left_after = n_tensors.saturating_sub(i);
        let must_move = left_after <= last_group.saturating_sub(g);
        let group_has = groups.get(g).is_some_and(|v| !v.is_empty());
        if g < last_group && group_has && (u128::from(acc) >= share || must_move) {
            g = g.saturating_add(1);
        }
        if let Some(v) = groups.get_mut(g) {
            v.push(t);
        }
        acc = acc.saturating_add(t.size);
    }

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SplitWriteError::Io { path, source }
    };
    let src_file = File::open(input).map_err(io(input))?;
    let info = SplitInfo {
        no: 0,
        count,
        tensors: n_tensors as u64,
    };
    let paths = split_paths(
        &input.with_file_name(format!("{stem}-00001-of-{count:05}.gguf")),
        info,
    )?;
    let split_keys = |no: u16| {
        vec![
            (SPLIT_NO_KEY.to_string(), Value::U16(no)),
            (SPLIT_COUNT_KEY.to_string(), Value::U16(count)),
            (
                SPLIT_TENSORS_KEY.to_string(),
                Value::I32(i32::try_from(n_tensors).unwrap_or(i32::MAX)),
            ),
        ]
    };
    let mut buf = vec![0u8; 1 << 20];
    for (no, (group, path)) in groups.iter().zip(&paths).enumerate() {
        let no = u16::try_from(no).unwrap_or(u16::MAX);
        let mut md: Vec<(String, Value)> = if no == 0 {
            src.metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            src.metadata
                .get(ALIGNMENT_KEY)
                .map(|v| (ALIGNMENT_KEY.to_string(), v.clone()))
                .into_iter()
                .collect()
        };
        md.extend(split_keys(no));
        let specs: Vec<TensorSpec> = group
            .iter()
            .map(|t| TensorSpec {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ggml_type: t.ggml_type,
            })
            .collect();
        let lay = super::layout(&md, &specs)?;
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
                    .map_err(io(input))?;
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
    }
    Ok(paths)
}
