//! Arbitrary bytes into the GGUF header reader: it must never panic, never allocate
//! more than the input could hold, and a header it accepts must keep its invariants,
//! also when summarised as a model.
#![no_main]

use expertd::gguf::{GgufFile, ModelInfo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = GgufFile::parse_bytes(data) {
        assert!(f.alignment.is_power_of_two());
        assert_eq!(f.data_offset % f.alignment, 0);
        for t in &f.tensors {
            assert_eq!(t.offset % f.alignment, 0);
            let end = f.data_offset + t.offset + t.size;
            assert!(end <= data.len() as u64, "{} ends past the input", t.name);
        }
        let _ = ModelInfo::from_gguf(&f);
    }
});
