//! Inverted lists: for each coarse centroid, the ids of its vectors and their codes, contiguous
//! so that a probe streams one list's codes without indirection.

/// Ids and fixed-size codes per list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvertedLists {
    code_size: usize,
    ids: Vec<Vec<u32>>,
    codes: Vec<Vec<u8>>,
}

impl InvertedLists {
    /// `nlist` empty lists holding codes of `code_size` bytes.
    pub fn new(nlist: usize, code_size: usize) -> Self {
        Self { code_size, ids: vec![Vec::new(); nlist], codes: vec![Vec::new(); nlist] }
    }
    /// Number of lists.
    pub fn nlist(&self) -> usize {
        self.ids.len()
    }
    /// Bytes per code.
    pub fn code_size(&self) -> usize {
        self.code_size
    }
    /// Entries in list `l`.
    pub fn list_len(&self, l: usize) -> usize {
        self.ids.get(l).map_or(0, Vec::len)
    }
    /// Ids of list `l` (empty when out of range).
    pub fn ids(&self, l: usize) -> &[u32] {
        self.ids.get(l).map_or(&[], Vec::as_slice)
    }
    /// Codes of list `l`, `list_len(l) × code_size` bytes (empty when out of range).
    pub fn codes(&self, l: usize) -> &[u8] {
        self.codes.get(l).map_or(&[], Vec::as_slice)
    }
    /// Appends one entry to list `l` (ignored when `l` or the code size is wrong; callers own both).
    pub fn push(&mut self, l: usize, id: u32, code: &[u8]) {
        if code.len() == self.code_size
            && let (Some(ids), Some(codes)) = (self.ids.get_mut(l), self.codes.get_mut(l))
        {
            ids.push(id);
            codes.extend_from_slice(code);
        }
    }
    /// Lists from their ids and codes (`ids[l].len() × code_size` bytes in `codes[l]`); the
    /// caller has checked the sizes.
    pub(crate) fn from_parts(code_size: usize, ids: Vec<Vec<u32>>, codes: Vec<Vec<u8>>) -> Self {
        Self { code_size, ids, codes }
    }
    /// Total entries.
    pub fn total(&self) -> usize {
        self.ids.iter().map(Vec::len).sum()
    }
    /// Bytes held by ids and codes.
    pub fn memory_bytes(&self) -> usize {
        self.ids.iter().map(|v| v.len() * 4).sum::<usize>() + self.codes.iter().map(Vec::len).sum::<usize>()
    }
}
