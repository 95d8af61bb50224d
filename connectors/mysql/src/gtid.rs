//! The GTID state the offset store keeps beside the binlog file and
//! offset: what a stream resumed by GTID asks the server for.
//!
//! Part of the offset stage of the MySQL dataflow. Two shapes, one per
//! server family, told apart by their text:
//! - MariaDB: one `domain-server-seq` per replication domain, comma
//!   separated (`0-1-17,2-5-9`), as in `@@gtid_binlog_pos`; a committed
//!   transaction replaces its domain's entry. Resuming sends it as
//!   `@slave_connect_state`.
//! - MySQL: the executed GTID set (`uuid:1-17:20,uuid2:1-5`), as in
//!   `@@gtid_executed`; a committed transaction adds its number to its
//!   UUID's intervals. Resuming sends it in `COM_BINLOG_DUMP_GTID`.

use std::collections::BTreeMap;

use mysql_async::{GnoInterval, Sid};

/// The GTID state at a transaction boundary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GtidState {
    /// MariaDB: the last GTID per domain, as `D-S-N`.
    domains: BTreeMap<u32, String>,
    /// MySQL: executed numbers per source UUID, as sorted, disjoint,
    /// inclusive ranges.
    sets: BTreeMap<String, Vec<(u64, u64)>>,
}

impl GtidState {
    /// Parses a stored state (either family's text); entries it cannot
    /// read are left out.
    pub fn parse(text: Option<&str>) -> Self {
        let mut state = Self::default();
        for entry in text.unwrap_or_default().split(',') {
            let entry = entry.trim();
            if let Some((uuid, ranges)) = entry.split_once(':') {
                for range in ranges.split(':') {
                    let (start, end) = range.split_once('-').unwrap_or((range, range));
                    if let (Ok(start), Ok(end)) = (start.parse(), end.parse())
                        && 0 < start
                        && start <= end
                    {
                        state.add_range(&uuid.to_ascii_lowercase(), start, end);
                    }
                }
            } else if let Some(domain) = entry.split('-').next().and_then(|d| d.parse().ok())
                && entry.split('-').count() == 3
            {
                state.domains.insert(domain, entry.to_owned());
            }
        }
        state
    }

    /// True when no GTID was seen.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty() && self.sets.is_empty()
    }

    /// True for a MySQL GTID set (resumed with `COM_BINLOG_DUMP_GTID`).
    pub fn is_mysql(&self) -> bool {
        !self.sets.is_empty()
    }

    /// A committed MariaDB transaction: `gtid` (`D-S-N`) becomes its
    /// domain's position.
    pub fn commit_mariadb(&mut self, domain: u32, gtid: String) {
        self.domains.insert(domain, gtid);
    }

    /// A committed MySQL transaction `uuid:gno` joins the set.
    pub fn commit_mysql(&mut self, uuid: &str, gno: u64) {
        if gno > 0 {
            self.add_range(uuid, gno, gno);
        }
    }

    fn add_range(&mut self, uuid: &str, start: u64, end: u64) {
        let ranges = self.sets.entry(uuid.to_owned()).or_default();
        ranges.push((start, end));
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for &(s, e) in ranges.iter() {
            match merged.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        *ranges = merged;
    }

    /// The stored text, or None when no GTID was seen.
    pub fn render(&self) -> Option<String> {
        let mut parts: Vec<String> = self.domains.values().cloned().collect();
        for (uuid, ranges) in &self.sets {
            let mut text = uuid.clone();
            for &(start, end) in ranges {
                if start == end {
                    text.push_str(&format!(":{start}"));
                } else {
                    text.push_str(&format!(":{start}-{end}"));
                }
            }
            parts.push(text);
        }
        (!parts.is_empty()).then(|| parts.join(","))
    }

    /// MariaDB's `@slave_connect_state` value.
    pub fn connect_state(&self) -> String {
        self.domains.values().cloned().collect::<Vec<_>>().join(",")
    }

    /// The executed set for MySQL's `COM_BINLOG_DUMP_GTID`.
    pub fn sids(&self) -> Vec<Sid<'static>> {
        self.sets
            .iter()
            .filter_map(|(uuid, ranges)| {
                let sid: Sid<'static> = format!("{uuid}:1").parse().ok()?;
                let intervals = ranges
                    .iter()
                    .map(|&(s, e)| GnoInterval::new(s, e.saturating_add(1)))
                    .collect();
                Some(sid.with_intervals(intervals))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mariadb_state_keeps_the_last_gtid_per_domain() {
        let mut state = GtidState::parse(Some("0-1-17,2-5-9"));
        assert!(!state.is_mysql());
        state.commit_mariadb(0, "0-2-18".into());
        state.commit_mariadb(3, "3-2-1".into());
        assert_eq!(state.render().as_deref(), Some("0-2-18,2-5-9,3-2-1"));
        assert_eq!(state.connect_state(), "0-2-18,2-5-9,3-2-1");
        assert_eq!(GtidState::parse(None).render(), None);
        assert!(GtidState::parse(Some("")).is_empty());
        assert!(GtidState::parse(Some("garbage")).is_empty());
    }

    #[test]
    fn mysql_set_merges_committed_numbers() {
        let uuid = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        let mut state = GtidState::parse(Some(&format!("{uuid}:1-5:8,\n{uuid}:10")));
        assert!(state.is_mysql());
        state.commit_mysql(uuid, 6);
        state.commit_mysql(uuid, 7);
        state.commit_mysql(uuid, 9);
        assert_eq!(state.render(), Some(format!("{uuid}:1-10")));
        state.commit_mysql("aaaaaaaa-0000-0000-0000-000000000001", 3);
        let sids = state.sids();
        assert_eq!(sids.len(), 2);
        assert_eq!(sids[0].to_string(), format!("{uuid}:1-10"));
        assert_eq!(sids[1].intervals()[0].start(), 3);
        assert_eq!(sids[1].intervals()[0].end(), 4, "the end is exclusive");
    }
}
