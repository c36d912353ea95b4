//! Models split over several GGUF files (llama.cpp's `gguf-split` layout): the splits
//! `write_split` writes read back as the whole model (same summary, same tensor bytes),
//! the probe sees the whole model from its first file, and every way a split set can be
//! wrong gives its own error naming the file. (That the engine reads these files like
//! llama.cpp's own splits is checked in `tests/tests/pool.rs`.)

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use expertd::gguf::{
    self, GgmlType, GgufError, GgufFile, GgufModel, ModelInfo, SPLIT_COUNT_KEY, SPLIT_NO_KEY,
    SPLIT_TENSORS_KEY, TensorSpec, Value,
};
use expertd::synth::{self, Preset, SynthConfig};

/// A small MoE model (about 1 MiB).
fn small(dir: &Path, name: &str) -> PathBuf {
    let mut c = SynthConfig::preset(Preset::Tiny);
    c.layers = 3;
    c.n_expert = 8;
    c.n_expert_used = 2;
    c.vocab = 512;
    let path = dir.join(name);
    synth::write_model(&c, &path, 1).expect("write");
    path
}

fn tensor_bytes(f: &GgufFile, name: &str) -> Vec<u8> {
    let t = f.tensor(name).expect("tensor");
    let mut buf = vec![0u8; t.size as usize];
    std::fs::File::open(&f.path)
        .unwrap()
        .read_exact_at(&mut buf, f.absolute_offset(t))
        .unwrap();
    buf
}

/// Why a split set was refused; panics (with the model) if it was accepted.
fn refused(path: &Path) -> GgufError {
    match GgufModel::open(path) {
        Ok(m) => panic!("accepted: {:?}", m.paths()),
        Err(e) => e,
    }
}

#[test]
fn a_split_model_reads_back_as_the_whole_model() {
    let dir = tempfile::tempdir().unwrap();
    let whole_path = small(dir.path(), "m.gguf");
    let whole = GgufFile::open(&whole_path).unwrap();
    let whole_info = ModelInfo::from_gguf(&whole).unwrap();

    for count in [2u16, 3, 5] {
        let paths = gguf::write_split(&whole_path, count).unwrap();
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let expected: Vec<String> = (1..=count)
            .map(|i| format!("m-{i:05}-of-{count:05}.gguf"))
            .collect();
        assert_eq!(names, expected);

        let model = GgufModel::open(&paths[0]).unwrap();
        assert_eq!(model.paths(), paths);
        assert_eq!(ModelInfo::from_model(&model).unwrap(), whole_info);
        assert_eq!(
            model.file_size(),
            paths
                .iter()
                .map(|p| std::fs::metadata(p).unwrap().len())
                .sum::<u64>()
        );
        // All metadata in the first file, only the split keys (and alignment) in the
        // others; every tensor in exactly one file, with its bytes; runs of about equal
        // bytes (within one tensor of an equal share).
        let largest = whole.tensors.iter().map(|t| t.size).max().unwrap();
        let share = whole.tensor_bytes() / u64::from(count);
        let mut seen = 0;
        for (no, f) in model.files().enumerate() {
            let split = gguf::split_info(f).unwrap().unwrap();
            assert_eq!(
                (split.no as usize, split.count, split.tensors),
                (no, count, whole.tensors.len() as u64)
            );
            assert!(!f.tensors.is_empty());
            if no == 0 {
                assert_eq!(f.metadata.len(), whole.metadata.len() + 3);
            } else {
                let allowed = [
                    "split.no",
                    "split.count",
                    "split.tensors.count",
                    "general.alignment",
                ];
                assert!(
                    f.metadata.keys().all(|k| allowed.contains(&k.as_str())),
                    "{:?}",
                    f.metadata.keys()
                );
            }
            assert!(
                f.tensor_bytes().abs_diff(share) <= largest,
                "split {no}: {} bytes, share {share}",
                f.tensor_bytes()
            );
            for t in &f.tensors {
                assert_eq!(
                    tensor_bytes(f, &t.name),
                    tensor_bytes(&whole, &t.name),
                    "{}",
                    t.name
                );
                seen += 1;
            }
        }
        assert_eq!(seen, whole.tensors.len());

        // The probe sees the whole model from the first file, and lists the splits.
        let probe = expertd::probe::model(&paths[0]).unwrap();
        assert_eq!(probe.info, whole_info);
        assert_eq!(probe.splits, paths);
        assert_eq!(probe.file_size, model.file_size());
        // One file alone is not summarised as if it were the model.
        let e = ModelInfo::from_gguf(model.files().next().unwrap()).unwrap_err();
        assert!(
            matches!(e, GgufError::SplitPart { no: 1, .. }) && e.path() == paths[0],
            "{e}"
        );
        for p in &paths {
            std::fs::remove_file(p).unwrap();
        }
    }
    let probe = expertd::probe::model(&whole_path).unwrap();
    assert!(probe.splits.is_empty());
    assert_eq!(probe.file_size, whole.file_size);
}

#[test]
fn every_split_count_gives_nonempty_splits() {
    let dir = tempfile::tempdir().unwrap();
    let path = small(dir.path(), "m.gguf");
    let whole = GgufFile::open(&path).unwrap();
    let info = ModelInfo::from_gguf(&whole).unwrap();
    let n = whole.tensors.len() as u16;
    for count in [n - 1, n] {
        let paths = gguf::write_split(&path, count).unwrap();
        let model = GgufModel::open(&paths[0]).unwrap();
        assert!(model.files().all(|f| !f.tensors.is_empty()), "{count}");
        assert_eq!(ModelInfo::from_model(&model).unwrap(), info);
        for p in &paths {
            std::fs::remove_file(p).unwrap();
        }
    }
}

#[test]
fn split_write_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = small(dir.path(), "m.gguf");
    let n = GgufFile::open(&path).unwrap().tensors.len();
    for count in [0u16, 1, n as u16 + 1] {
        let e = gguf::write_split(&path, count).unwrap_err().to_string();
        assert!(
            e.starts_with(&path.display().to_string())
                && e.contains(&format!("into {count} files")),
            "{e}"
        );
    }
    let paths = gguf::write_split(&path, 2).unwrap();
    let e = gguf::write_split(&paths[0], 2).unwrap_err().to_string();
    assert!(e.contains("already a split file"), "{e}");
}

/// A file `gguf-split --merge` made keeps `split.no`, `split.tensors.count` and a
/// `split.count` of 0: a whole model, which splits again (its old keys replaced).
#[test]
fn a_merged_model_splits_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = small(dir.path(), "m.gguf");
    let f = GgufFile::open(&path).unwrap();
    let mut md: Vec<(String, Value)> = f
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    md.extend(split_keys(0, 0, f.tensors.len() as i32));
    let specs: Vec<TensorSpec> = f.tensors.iter().map(TensorSpec::from).collect();
    let lay = gguf::layout(&md, &specs).unwrap();
    let merged = dir.path().join("merged.gguf");
    let out = std::fs::File::create(&merged).unwrap();
    out.set_len(lay.file_size).unwrap();
    out.write_all_at(&lay.header, 0).unwrap();
    for (from, to) in f.tensors.iter().zip(&lay.tensors) {
        out.write_all_at(&tensor_bytes(&f, &from.name), lay.data_offset + to.offset)
            .unwrap();
    }
    let info = ModelInfo::from_gguf(&GgufFile::open(&merged).unwrap()).unwrap();
    let paths = gguf::write_split(&merged, 2).unwrap();
    let model = GgufModel::open(&paths[0]).unwrap();
    assert_eq!(ModelInfo::from_model(&model).unwrap(), info);
}

#[test]
fn broken_split_sets_are_named_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = small(dir.path(), "m.gguf");
    let paths = gguf::write_split(&path, 3).unwrap();
    // Every message starts with the file it is about.
    let about = |e: &GgufError, p: &Path| {
        assert_eq!(e.path(), p, "{e}");
        assert!(e.to_string().starts_with(&p.display().to_string()), "{e}");
        e.to_string()
    };

    // A later split given instead of the first.
    let e = refused(&paths[1]);
    assert!(
        matches!(
            e,
            GgufError::SplitNotFirst {
                no: 2,
                count: 3,
                ..
            }
        ),
        "{e:?}"
    );
    let m = about(&e, &paths[1]);
    assert!(
        m.contains(&format!("first split, {}", paths[0].display())),
        "{m}"
    );

    // A missing split.
    let moved = dir.path().join("away.gguf");
    std::fs::rename(&paths[2], &moved).unwrap();
    let e = refused(&paths[0]);
    assert!(
        matches!(
            e,
            GgufError::SplitMissing {
                no: 3,
                count: 3,
                ..
            }
        ),
        "{e:?}"
    );
    let m = about(&e, &paths[2]);
    assert!(m.contains("missing: split 3 of 3"), "{m}");
    std::fs::rename(&moved, &paths[2]).unwrap();
    GgufModel::open(&paths[0]).unwrap();

    // A first split renamed so that the others cannot be found.
    let renamed = dir.path().join("renamed.gguf");
    std::fs::copy(&paths[0], &renamed).unwrap();
    let e = refused(&renamed);
    assert!(matches!(e, GgufError::SplitName { .. }), "{e:?}");
    let m = about(&e, &renamed);
    assert!(m.contains("does not end in '-00001-of-00003.gguf'"), "{m}");

    // A split of a two-file set standing in for split 2 of three.
    let other_dir = tempfile::tempdir().unwrap();
    let other = small(other_dir.path(), "m.gguf");
    let two = gguf::write_split(&other, 2).unwrap();
    std::fs::copy(&two[1], &paths[1]).unwrap();
    let e = refused(&paths[0]);
    assert!(matches!(e, GgufError::SplitMismatch { no: 2, .. }), "{e:?}");
    let m = about(&e, &paths[1]);
    assert!(
        m.contains("says it is split 2 of 2, expected split 2 of 3"),
        "{m}"
    );
    // A whole model standing in for split 2.
    std::fs::copy(&other, &paths[1]).unwrap();
    let e = refused(&paths[0]);
    let m = about(&e, &paths[1]);
    assert!(m.contains("a whole model, not a split"), "{m}");
}

/// Writes a header-only file (tensor data zero) with these keys and tensors.
fn write_raw(path: &Path, md: &[(String, Value)], tensors: &[&str]) {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|n| TensorSpec {
            name: n.to_string(),
            dims: vec![32],
            ggml_type: GgmlType::F32,
        })
        .collect();
    let lay = gguf::layout(md, &specs).unwrap();
    let f = std::fs::File::create(path).unwrap();
    f.set_len(lay.file_size).unwrap();
    f.write_all_at(&lay.header, 0).unwrap();
}

fn split_keys(no: u16, count: u16, tensors: i32) -> Vec<(String, Value)> {
    vec![
        (SPLIT_NO_KEY.into(), Value::U16(no)),
        (SPLIT_COUNT_KEY.into(), Value::U16(count)),
        (SPLIT_TENSORS_KEY.into(), Value::I32(tensors)),
    ]
}

#[test]
fn split_keys_that_do_not_add_up_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |i: u32| dir.path().join(format!("x-{i:05}-of-00002.gguf"));

    // The tensor count of the set is not what the files hold.
    write_raw(&p(1), &split_keys(0, 2, 5), &["a", "b"]);
    write_raw(&p(2), &split_keys(1, 2, 5), &["c", "d"]);
    let e = refused(&p(1));
    assert_eq!(e.path(), p(1));
    assert!(
        e.to_string()
            .contains("split.tensors.count is 5 but the 2 splits hold 4 tensors"),
        "{e}"
    );

    // A tensor in two files.
    write_raw(&p(1), &split_keys(0, 2, 3), &["a", "b"]);
    write_raw(&p(2), &split_keys(1, 2, 3), &["b"]);
    let e = refused(&p(1));
    assert_eq!(e.path(), p(2));
    assert!(
        e.to_string()
            .contains("tensor 'b' is also in an earlier split"),
        "{e}"
    );

    // Keys of another type than llama.cpp's (it refuses them too), out of range, missing.
    for (i, wrong) in [Value::String("two".into()), Value::U32(2), Value::I32(2)]
        .into_iter()
        .enumerate()
    {
        let mut md = split_keys(0, 2, 2);
        md[1].1 = wrong;
        write_raw(&p(1), &md, &["a"]);
        let e = refused(&p(1));
        assert!(
            matches!(&e, GgufError::BadKey { key, .. } if key == "split.count")
                && e.to_string().contains("expected u16"),
            "case {i}: {e}"
        );
    }
    let mut md = split_keys(0, 2, 2);
    md[2].1 = Value::U32(2);
    write_raw(&p(1), &md, &["a"]);
    let e = refused(&p(1));
    assert!(
        matches!(&e, GgufError::BadKey { key, .. } if key == "split.tensors.count"),
        "{e}"
    );
    write_raw(&p(1), &split_keys(0, 2, -1), &["a"]);
    let e = refused(&p(1)).to_string();
    assert!(e.contains("-1 is negative"), "{e}");
    write_raw(&p(1), &split_keys(2, 2, 2), &["a"]);
    let e = refused(&p(1)).to_string();
    assert!(e.contains("split 2 (0-based) of 2 is out of range"), "{e}");
    write_raw(&p(1), &[(SPLIT_COUNT_KEY.into(), Value::U16(2))], &["a"]);
    let e = refused(&p(1));
    assert!(
        matches!(&e, GgufError::MissingKey { key, .. } if key == "split.no"),
        "{e}"
    );

    // split.count 1 is a whole model, as llama.cpp reads it.
    write_raw(&p(1), &split_keys(0, 1, 1), &["a"]);
    let m = GgufModel::open(&p(1)).unwrap();
    assert_eq!(m.paths(), vec![p(1)]);
}

#[test]
fn split_names_give_every_split() {
    let d = Path::new("/m");
    assert_eq!(
        gguf::split_paths_by_name(&d.join("Qwen-A3B-Q4_K_M-00002-of-00003.gguf")),
        Some(vec![
            d.join("Qwen-A3B-Q4_K_M-00001-of-00003.gguf"),
            d.join("Qwen-A3B-Q4_K_M-00002-of-00003.gguf"),
            d.join("Qwen-A3B-Q4_K_M-00003-of-00003.gguf"),
        ])
    );
    // llama.cpp takes the prefix from the whole path
    assert_eq!(
        gguf::split_paths_by_name(&d.join("-00001-of-00002.gguf")),
        Some(vec![
            d.join("-00001-of-00002.gguf"),
            d.join("-00002-of-00002.gguf")
        ])
    );
    for not_split in [
        "model.gguf",
        "m-00001-of-99999.gguf",
        "m-00001-of-00001.gguf",
        "m-00000-of-00002.gguf",
        "m-00003-of-00002.gguf",
        "m-0001-of-00002.gguf",
        "m-00001-of-00002.bin",
        "m-0000a-of-00002.gguf",
    ] {
        assert_eq!(
            gguf::split_paths_by_name(&d.join(not_split)),
            None,
            "{not_split}"
        );
    }
}
