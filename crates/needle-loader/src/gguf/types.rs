//! ggml tensor types: ids, block sizes and names, as gguf-py's `GGML_QUANT_SIZES` lists them.

/// A ggml tensor element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType {
    /// Numeric id in GGUF tensor infos.
    pub id: u32,
    /// Name, as llama.cpp prints it (`Q4_1`, `F32`).
    pub name: &'static str,
    /// Elements per block.
    pub block_elems: usize,
    /// Bytes per block.
    pub block_bytes: usize,
}

const fn t(id: u32, name: &'static str, block_elems: usize, block_bytes: usize) -> GgmlType {
    GgmlType { id, name, block_elems, block_bytes }
}

/// Every type id this crate can size (so unknown-but-unused tensors still pass bounds checks).
const TYPES: &[GgmlType] = &[
    t(0, "F32", 1, 4),
    t(1, "F16", 1, 2),
    t(2, "Q4_0", 32, 18),
    t(3, "Q4_1", 32, 20),
    t(6, "Q5_0", 32, 22),
    t(7, "Q5_1", 32, 24),
    t(8, "Q8_0", 32, 34),
    t(9, "Q8_1", 32, 40),
    t(10, "Q2_K", 256, 84),
    t(11, "Q3_K", 256, 110),
    t(12, "Q4_K", 256, 144),
    t(13, "Q5_K", 256, 176),
    t(14, "Q6_K", 256, 210),
    t(15, "Q8_K", 256, 292),
    t(16, "IQ2_XXS", 256, 66),
    t(17, "IQ2_XS", 256, 74),
    t(18, "IQ3_XXS", 256, 98),
    t(19, "IQ1_S", 256, 50),
    t(20, "IQ4_NL", 32, 18),
    t(21, "IQ3_S", 256, 110),
    t(22, "IQ2_S", 256, 82),
    t(23, "IQ4_XS", 256, 136),
    t(24, "I8", 1, 1),
    t(25, "I16", 1, 2),
    t(26, "I32", 1, 4),
    t(27, "I64", 1, 8),
    t(28, "F64", 1, 8),
    t(29, "IQ1_M", 256, 56),
    t(30, "BF16", 1, 2),
    t(34, "TQ1_0", 256, 54),
    t(35, "TQ2_0", 256, 66),
    t(39, "MXFP4", 32, 17),
];

impl GgmlType {
    /// `F32`.
    pub const F32: GgmlType = t(0, "F32", 1, 4);
    /// `F16`.
    pub const F16: GgmlType = t(1, "F16", 1, 2);
    /// `Q4_0`.
    pub const Q4_0: GgmlType = t(2, "Q4_0", 32, 18);
    /// `Q4_1`.
    pub const Q4_1: GgmlType = t(3, "Q4_1", 32, 20);
    /// `Q8_0`.
    pub const Q8_0: GgmlType = t(8, "Q8_0", 32, 34);
    /// `Q4_K`.
    pub const Q4_K: GgmlType = t(12, "Q4_K", 256, 144);
    /// `Q6_K`.
    pub const Q6_K: GgmlType = t(14, "Q6_K", 256, 210);
    /// `BF16`.
    pub const BF16: GgmlType = t(30, "BF16", 1, 2);

    /// Looks a type up by id.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().copied().find(|t| t.id == id)
    }

    /// Whether [`dequantize`](crate::gguf::dequantize) handles this type.
    pub fn can_dequantize(&self) -> bool {
        needle_quant::QuantType::from_ggml_id(self.id).is_ok()
    }

    /// Bytes taken by `n` elements, or `None` when `n` is not a whole number of blocks or overflows.
    pub fn bytes_for(&self, n: u64) -> Option<u64> {
        let be = self.block_elems as u64;
        if !n.is_multiple_of(be) {
            return None;
        }
        (n / be).checked_mul(self.block_bytes as u64)
    }
}

/// Human list of the dequantisable types, for errors.
pub(crate) const SUPPORTED_NAMES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q4_K, Q5_K, Q6_K";
