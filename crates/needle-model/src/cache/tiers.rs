//! The host budget of a cache's KV pages and the disk tier they spill to.

use super::*;

/// The host budget and the disk tier pages go to past it.
pub(super) struct Tiers {
    /// Bytes of pages the host tier may hold.
    pub(super) host: u64,
    pub(super) spill: SpillFile,
    /// Advances once per forward pass: the "time" of [`HeadCache::last_read`].
    pub(super) clock: u64,
    /// Whether the budget was found too small for the pages being filled (said once).
    pub(super) warned: bool,
}

impl<M> KvCache<M> {
    /// Holds the KV pages in RAM to `budget.host` bytes: past it, the pages decode read least
    /// recently (static parts last) move to an unnamed spill file in `dir`, at most
    /// `budget.disk` bytes, and are read back in place when a selector picks them. Applies at
    /// once and after every forward pass. A budget with no host limit removes the tiering (pages
    /// already spilled stay where they are). `budget.device` is the device tier's, kept for a
    /// device backend's mirror ([`KvCache::device_budget`]).
    pub fn set_kv_budget(&mut self, budget: TierBudget, dir: &std::path::Path) -> Result<()> {
        self.device_budget = budget.device;
        let Some(host) = budget.host else {
            self.tiers = None;
            return Ok(());
        };
        let spill = SpillFile::create(dir, budget.disk)?;
        self.tiers = Some(Tiers { host, spill, clock: 0, warned: false });
        self.enforce_budget()
    }

    /// Bytes of KV rows a device backend may keep on the device (`--kv-budget device=…`), all
    /// layers together; `None`: every row. Host backends have no device tier and ignore it.
    pub fn device_budget(&self) -> Option<u64> {
        self.device_budget
    }

    /// Bytes of KV pages in RAM and on the disk tier (spilled, or read in place from a loaded
    /// context file).
    pub fn tier_bytes(&self) -> (usize, usize) {
        let heads = self.heads.iter().flatten();
        heads.fold((0, 0), |(host, disk), h| {
            let (all, ram) = (h.keys.bytes() + h.values.bytes(), h.keys.host_bytes() + h.values.host_bytes());
            (host + ram, disk + all - ram)
        })
    }

    /// Spills the coldest full pages until the host tier is within its budget.
    pub(super) fn enforce_budget(&mut self) -> Result<()> {
        let Some(tiers) = self.tiers.as_mut() else { return Ok(()) };
        tiers.clock += 1;
        let limit = tiers.host;
        let host: usize = self.heads.iter().flatten().map(|h| h.keys.host_bytes() + h.values.host_bytes()).sum();
        if host as u64 <= limit {
            return Ok(());
        }
        // (static part?, last read, page, layer, head): pages outside the static parts go
        // first, least recently read first, older pages first among equals.
        let mut candidates = Vec::new();
        for (layer, row) in self.heads.iter_mut().enumerate() {
            for (j, h) in row.iter_mut().enumerate() {
                let (n, ps) = (h.keys.len(), h.keys.page_size());
                h.last_read.resize(h.keys.pages().count(), 0);
                let dynamic = h.selector.static_part().dynamic_range(n);
                let (ds, de) = (dynamic.start as usize, dynamic.end as usize);
                for p in (0..h.keys.full_pages()).filter(|&p| h.keys.pages().is_host(p) || h.values.pages().is_host(p))
                {
                    let in_static = p * ps < ds || (p + 1) * ps > de;
                    candidates.push((in_static, h.last_read[p], p, layer, j));
                }
            }
        }
        candidates.sort_unstable();
        let mut over = host as u64 - limit;
        for (_, _, p, layer, j) in candidates {
            let h = &mut self.heads[layer][j];
            let page = h.keys.page_bytes() as u64;
            for rows in [&mut h.keys, &mut h.values] {
                if rows.spill_page(p, &mut tiers.spill)? {
                    self.stats.pages_spilled += 1;
                    over = over.saturating_sub(page);
                }
            }
            if over == 0 {
                return Ok(());
            }
        }
        if !std::mem::replace(&mut tiers.warned, true) {
            tracing::warn!(
                "the KV pages being filled (one per layer, KV head, keys and values) exceed the host budget of {limit} bytes by {over}"
            );
        }
        Ok(())
    }

    /// Stamps the pages decode attention read for each head of `layer` and counts those it
    /// read from the disk tier.
    pub(super) fn note_reads(&mut self, layer: usize) {
        let Some(tiers) = self.tiers.as_ref() else { return };
        let mut pages: Vec<u32> = Vec::new();
        for h in &mut self.heads[layer] {
            let (n, ps) = (h.keys.len(), h.keys.page_size() as u32);
            h.last_read.resize(h.keys.pages().count(), 0);
            let dynamic = h.selector.static_part().dynamic_range(n);
            pages.clear();
            pages.extend(0..dynamic.start.div_ceil(ps));
            if (dynamic.end as usize) < n {
                pages.extend(dynamic.end / ps..=(n as u32 - 1) / ps);
            }
            pages.extend(h.selection.ids.iter().map(|id| id / ps));
            pages.sort_unstable();
            pages.dedup();
            for &p in &pages {
                h.last_read[p as usize] = tiers.clock;
                let on_disk = [&h.keys, &h.values].iter().filter(|r| !r.pages().is_host(p as usize)).count();
                self.stats.pages_faulted += on_disk as u64;
            }
        }
    }
}
