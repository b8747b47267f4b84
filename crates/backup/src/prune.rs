//! Retention: which points to keep, per group, by count and by calendar buckets, and
//! removing the others' manifests (their chunks go at the next [`crate::gc()`]).
//!
//! Rules, as restic and borg apply them: within a group, newest first, `keep_last` keeps
//! the N newest; `keep_hourly` keeps the newest point of each of the N newest hours that
//! have one; likewise days, ISO weeks, months and years (UTC). A point is kept if any rule
//! keeps it. Removal deletes one manifest at a time, each atomically: a prune killed at
//! any instant leaves every listed point whole.

use crate::error::{Error, Result};
use crate::point::{Point, to_ns};
use crate::repo::Repository;
use std::collections::BTreeMap;
use std::time::SystemTime;

/// How many of each to keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    /// The N newest.
    pub last: u32,
    /// The newest of each of the N newest hours.
    pub hourly: u32,
    /// ... days.
    pub daily: u32,
    /// ... ISO weeks.
    pub weekly: u32,
    /// ... months.
    pub monthly: u32,
    /// ... years.
    pub yearly: u32,
}

impl KeepPolicy {
    fn keeps_nothing(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

/// The decision about one point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The point.
    pub id: String,
    /// Its group.
    pub group: String,
    /// Its time.
    pub time: SystemTime,
    /// Whether it stays.
    pub keep: bool,
    /// The rules that keep it (`last`, `hourly`, ...).
    pub reasons: Vec<&'static str>,
}

/// What a prune decided and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Every point considered, newest first within each group.
    pub decisions: Vec<Decision>,
    /// Points removed (none on a dry run).
    pub removed: Vec<String>,
    /// Points whose manifest does not open (never removed by prune).
    pub damaged: Vec<String>,
}

/// Civil date (UTC) of a Unix day: Howard Hinnant's `civil_from_days`.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// ISO year and week of a Unix day.
fn iso_week(days: i64) -> (i64, u32) {
    // 1970-01-01 was a Thursday; weekday 0 = Monday.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (y, _, _) = civil(thursday);
    let jan1 = days_from_civil(y, 1, 1);
    (y, ((thursday - jan1) / 7 + 1) as u32)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Decides, for points of one group or many, which to keep.
pub fn plan(points: &[Point], policy: &KeepPolicy) -> Vec<Decision> {
    let mut groups: BTreeMap<&str, Vec<&Point>> = BTreeMap::new();
    for p in points {
        groups.entry(&p.group).or_default().push(p);
    }
    let mut out = Vec::new();
    for (_, mut ps) in groups {
        ps.sort_by(|a, b| (b.time, &b.id).cmp(&(a.time, &a.id)));
        let mut reasons: Vec<Vec<&'static str>> = vec![Vec::new(); ps.len()];
        for (i, r) in reasons.iter_mut().enumerate().take(policy.last as usize) {
            let _ = i;
            r.push("last");
        }
        type Bucket = fn(i64) -> (i64, u32, u32, u32);
        let rules: [(&'static str, u32, Bucket); 5] = [
            ("hourly", policy.hourly, |s| {
                let (y, m, d) = civil(s.div_euclid(86_400));
                (y, m, d, (s.rem_euclid(86_400) / 3600) as u32)
            }),
            ("daily", policy.daily, |s| {
                let (y, m, d) = civil(s.div_euclid(86_400));
                (y, m, d, 0)
            }),
            ("weekly", policy.weekly, |s| {
                let (y, w) = iso_week(s.div_euclid(86_400));
                (y, w, 0, 0)
            }),
            ("monthly", policy.monthly, |s| {
                let (y, m, _) = civil(s.div_euclid(86_400));
                (y, m, 0, 0)
            }),
            ("yearly", policy.yearly, |s| {
                let (y, _, _) = civil(s.div_euclid(86_400));
                (y, 0, 0, 0)
            }),
        ];
        for (name, count, bucket) in rules {
            let mut left = count;
            let mut last = None;
            for (i, p) in ps.iter().enumerate() {
                if left == 0 {
                    break;
                }
                let secs = (to_ns(p.time).div_euclid(1_000_000_000)) as i64;
                let b = bucket(secs);
                if last != Some(b) {
                    last = Some(b);
                    reasons[i].push(name);
                    left -= 1;
                }
            }
        }
        for (p, r) in ps.iter().zip(reasons) {
            out.push(Decision {
                id: p.id.clone(),
                group: p.group.clone(),
                time: p.time,
                keep: !r.is_empty(),
                reasons: r,
            });
        }
    }
    out
}

/// Applies `policy` to the points of `groups` (all groups when `None`), removing the
/// manifests of the points it does not keep unless `dry_run`.
pub fn prune(
    repo: &Repository,
    policy: &KeepPolicy,
    groups: Option<&[String]>,
    dry_run: bool,
) -> Result<PruneReport> {
    if policy.keeps_nothing() {
        return Err(Error::Invalid(
            "this policy keeps nothing and would remove every point: give at least one keep rule"
                .into(),
        ));
    }
    let listing = repo.list_points()?;
    let points: Vec<Point> = listing
        .points
        .into_iter()
        .filter(|p| groups.is_none_or(|g| g.contains(&p.group)))
        .collect();
    let decisions = plan(&points, policy);
    let mut removed = Vec::new();
    if !dry_run {
        for d in decisions.iter().filter(|d| !d.keep) {
            repo.delete_point(&d.id)?;
            tracing::info!(point = %d.id, group = %d.group, "point pruned");
            removed.push(d.id.clone());
        }
    }
    Ok(PruneReport {
        decisions,
        removed,
        damaged: listing.damaged.into_iter().map(|(id, _)| id).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::from_ns;

    #[test]
    fn calendar_matches_known_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(civil(days_from_civil(2000, 12, 31)), (2000, 12, 31));
        // 2021-01-03 is in ISO week 53 of 2020; 2021-01-04 starts week 1 of 2021.
        assert_eq!(iso_week(days_from_civil(2021, 1, 3)), (2020, 53));
        assert_eq!(iso_week(days_from_civil(2021, 1, 4)), (2021, 1));
        assert_eq!(iso_week(days_from_civil(2026, 12, 2)), (2026, 49));
    }

    fn point(id: &str, group: &str, secs: i64) -> Point {
        Point {
            id: id.into(),
            group: group.into(),
            time: from_ns(i128::from(secs) * 1_000_000_000),
            committed: from_ns(i128::from(secs) * 1_000_000_000),
            chunk_size: 1 << 20,
            fields: BTreeMap::new(),
            blobs: Vec::new(),
            disks: Vec::new(),
        }
    }

    #[test]
    fn keeps_per_group_by_count_and_bucket() {
        let day = 86_400;
        let base = days_from_civil(2026, 3, 10) * day;
        // Group a: two points a day for five days; group b: one point.
        let mut ps = Vec::new();
        for d in 0..5 {
            ps.push(point(&format!("a{d}m"), "a", base + d * day + 3600));
            ps.push(point(&format!("a{d}e"), "a", base + d * day + 20 * 3600));
        }
        ps.push(point("b0", "b", base));
        let policy = KeepPolicy {
            last: 1,
            daily: 3,
            ..Default::default()
        };
        let kept: Vec<String> = plan(&ps, &policy)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.id)
            .collect();
        // Newest of each of the three newest days (the newest also by `last`), and b's only.
        assert_eq!(kept, vec!["a4e", "a3e", "a2e", "b0"]);
    }
}
