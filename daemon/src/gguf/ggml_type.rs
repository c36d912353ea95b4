//! The ggml type table at the pin: `enum ggml_type` in ggml/include/ggml.h and the block
//! sizes of `type_traits` in ggml/src/ggml.c (block structs in ggml-common.h). Removed
//! types (4, 5, 31-33, 36-38) are unknown, as they are to the pinned loader.

// Never panic on any input: no indexing, unwrap, panics or unchecked arithmetic.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]

use super::GgmlType;

/// Name, elements per block, bytes per block.
#[derive(Clone, Copy, Debug)]
pub(super) struct Traits {
    pub name: &'static str,
    pub block_size: u64,
    pub type_size: u64,
}

const fn t(name: &'static str, block_size: u64, type_size: u64) -> Option<Traits> {
    Some(Traits {
        name,
        block_size,
        type_size,
    })
}

const QK_K: u64 = 256;

/// Indexed by type id; `None` marks removed ids.
const TABLE: [Option<Traits>; 43] = [
    t("f32", 1, 4),                                               // 0
    t("f16", 1, 2),                                               // 1
    t("q4_0", 32, 2 + 16),                                        // 2
    t("q4_1", 32, 2 + 2 + 16),                                    // 3
    None,                                                         // 4: Q4_2, removed
    None,                                                         // 5: Q4_3, removed
    t("q5_0", 32, 2 + 4 + 16),                                    // 6
    t("q5_1", 32, 2 + 2 + 4 + 16),                                // 7
    t("q8_0", 32, 2 + 32),                                        // 8
    t("q8_1", 32, 2 + 2 + 32),                                    // 9
    t("q2_K", QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),                // 10
    t("q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),                // 11
    t("q4_K", QK_K, 2 + 2 + 12 + QK_K / 2),                       // 12
    t("q5_K", QK_K, 2 + 2 + 12 + QK_K / 2 + QK_K / 8),            // 13
    t("q6_K", QK_K, 2 + QK_K / 16 + 3 * QK_K / 4),                // 14
    t("q8_K", QK_K, 4 + QK_K + QK_K / 16 * 2),                    // 15
    t("iq2_xxs", QK_K, 2 + QK_K / 8 * 2),                         // 16
    t("iq2_xs", QK_K, 2 + QK_K / 8 * 2 + QK_K / 32),              // 17
    t("iq3_xxs", QK_K, 2 + 3 * (QK_K / 8)),                       // 18
    t("iq1_s", QK_K, 2 + QK_K / 8 + QK_K / 16),                   // 19
    t("iq4_nl", 32, 2 + 16),                                      // 20
    t("iq3_s", QK_K, 2 + 13 * (QK_K / 32) + QK_K / 64),           // 21
    t("iq2_s", QK_K, 2 + QK_K / 4 + QK_K / 16),                   // 22
    t("iq4_xs", QK_K, 2 + 2 + QK_K / 64 + QK_K / 2),              // 23
    t("i8", 1, 1),                                                // 24
    t("i16", 1, 2),                                               // 25
    t("i32", 1, 4),                                               // 26
    t("i64", 1, 8),                                               // 27
    t("f64", 1, 8),                                               // 28
    t("iq1_m", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),           // 29
    t("bf16", 1, 2),                                              // 30
    None,                                                         // 31: Q4_0_4_4, removed
    None,                                                         // 32: Q4_0_4_8, removed
    None,                                                         // 33: Q4_0_8_8, removed
    t("tq1_0", QK_K, 2 + QK_K / 64 + (QK_K - 4 * QK_K / 64) / 5), // 34
    t("tq2_0", QK_K, 2 + QK_K / 4),                               // 35
    None,                                                         // 36: IQ4_NL_4_4, removed
    None,                                                         // 37: IQ4_NL_4_8, removed
    None,                                                         // 38: IQ4_NL_8_8, removed
    t("mxfp4", 32, 1 + 16),                                       // 39
    t("nvfp4", 64, 64 / 16 + 64 / 2),                             // 40
    t("q1_0", 128, 2 + 128 / 8),                                  // 41
    t("q2_0", 64, 2 + 64 / 4),                                    // 42
];

/// The traits of a known type.
pub(super) fn traits(ty: GgmlType) -> Option<Traits> {
    let i = usize::try_from(ty.0).ok()?;
    TABLE.get(i).copied().flatten()
}

pub(super) fn from_name(name: &str) -> Option<GgmlType> {
    all().find(|ty| traits(*ty).is_some_and(|t| t.name.eq_ignore_ascii_case(name)))
}

pub(super) fn all() -> impl Iterator<Item = GgmlType> {
    (0u32..)
        .take(TABLE.len())
        .map(GgmlType)
        .filter(|ty| traits(*ty).is_some())
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    /// Sizes checked by hand against the static_asserts in ggml-common.h and gguf-py's
    /// GGML_QUANT_SIZES at the pin.
    #[test]
    fn known_sizes() {
        let cases: &[(u32, &str, u64, u64)] = &[
            (0, "f32", 1, 4),
            (2, "q4_0", 32, 18),
            (8, "q8_0", 32, 34),
            (10, "q2_K", 256, 84),
            (11, "q3_K", 256, 110),
            (12, "q4_K", 256, 144),
            (13, "q5_K", 256, 176),
            (14, "q6_K", 256, 210),
            (15, "q8_K", 256, 292),
            (16, "iq2_xxs", 256, 66),
            (17, "iq2_xs", 256, 74),
            (18, "iq3_xxs", 256, 98),
            (19, "iq1_s", 256, 50),
            (21, "iq3_s", 256, 110),
            (22, "iq2_s", 256, 82),
            (23, "iq4_xs", 256, 136),
            (29, "iq1_m", 256, 56),
            (30, "bf16", 1, 2),
            (34, "tq1_0", 256, 54),
            (35, "tq2_0", 256, 66),
            (39, "mxfp4", 32, 17),
            (40, "nvfp4", 64, 36),
            (41, "q1_0", 128, 18),
            (42, "q2_0", 64, 18),
        ];
        for &(id, name, bs, ts) in cases {
            let ty = GgmlType(id);
            assert_eq!(ty.name(), Some(name), "type {id}");
            assert_eq!(ty.block_size(), Some(bs), "type {id}");
            assert_eq!(ty.type_size(), Some(ts), "type {id}");
            assert_eq!(GgmlType::from_name(name), Some(ty));
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 43, 1000, u32::MAX] {
            assert_eq!(GgmlType(removed).name(), None, "type {removed}");
        }
        assert_eq!(GgmlType::all().count(), 43 - 8);
    }

    #[test]
    fn row_bytes() {
        assert_eq!(GgmlType::Q4_K.row_bytes(1024), Some(4 * 144));
        assert_eq!(GgmlType::Q4_K.row_bytes(1000), None);
        assert_eq!(GgmlType::Q8_0.row_bytes(64), Some(68));
        assert_eq!(GgmlType::F32.row_bytes(3), Some(12));
        assert_eq!(GgmlType(4).row_bytes(32), None);
        assert_eq!(GgmlType::F32.row_bytes(u64::MAX), None);
    }
}
