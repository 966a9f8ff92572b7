//! Where the shards run: which CPUs take the interrupts of the disk that holds the
//! data directory, and the plan that keeps shards off them.
//!
//! Measured on the development machine (2 vCPUs, one virtio disk whose interrupts all
//! go to CPU 1): a shard on the interrupt CPU saw its O_DIRECT write completions
//! arrive on 4 ms scheduler-tick boundaries and its fdatasync worker wait as long, so
//! memory-durability appends at 100k msgs/s in 50 KB requests had ack p50 667 ms,
//! against 0.95 ms with the shard on CPU 0 (docs/ARCHITECTURE.md, "Placement").
//! glommio busy-polls while writes are in flight, which keeps the interrupt CPU's
//! completion work waiting behind it.
//!
//! Everything here reads `/proc` and `/sys` and degrades to "nothing known" (one
//! unpinned shard per CPU) when a file is missing or unexpected.

use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

/// How shards are placed on CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PlacementMode {
    /// Pin shards to the CPUs that do not take the data disk's interrupts (by
    /// default one shard per such CPU); when no CPU is free of them, or nothing is
    /// known, run one unpinned shard per CPU.
    #[default]
    Auto,
    /// Pin shard `i` to CPU `i`.
    Pinned,
    /// Let the kernel place every shard.
    Unpinned,
}

/// Each shard's CPU (`None`: unpinned).
pub type Plan = Vec<Option<usize>>;

/// The plan for `cores` shards (0 = the mode's default) on `cpus`, given the CPUs
/// that take the data disk's interrupts.
pub fn plan(mode: PlacementMode, cores: usize, cpus: &[usize], irq_cpus: &BTreeSet<usize>) -> Plan {
    let all = cpus.len().max(1);
    match mode {
        PlacementMode::Unpinned => vec![None; if cores == 0 { all } else { cores }],
        PlacementMode::Pinned => {
            let n = if cores == 0 { all } else { cores };
            (0..n).map(|i| cpus.get(i).copied()).collect()
        }
        PlacementMode::Auto => {
            let free: Vec<usize> = cpus
                .iter()
                .copied()
                .filter(|c| !irq_cpus.contains(c))
                .collect();
            let known = !irq_cpus.is_empty() && !free.is_empty();
            match (known, cores) {
                (true, 0) => free.into_iter().map(Some).collect(),
                (true, n) if n <= free.len() => free.into_iter().take(n).map(Some).collect(),
                (_, 0) => vec![None; all],
                (_, n) => vec![None; n],
            }
        }
    }
}

/// Where the io_uring workers of pinned shards should run (fdatasync runs on
/// them): the allowed CPUs that no shard is pinned to. `None` when no shard is
/// pinned or every CPU has one; the workers then keep their default.
pub fn io_worker_cpus(plan: &Plan, cpus: &[usize]) -> Option<Vec<usize>> {
    let pinned: BTreeSet<usize> = plan.iter().flatten().copied().collect();
    if pinned.is_empty() {
        return None;
    }
    let free: Vec<usize> = cpus
        .iter()
        .copied()
        .filter(|c| !pinned.contains(c))
        .collect();
    (!free.is_empty()).then_some(free)
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .and_then(|l| parse_cpu_list(l.trim()))
        })
        .map(|set| set.into_iter().collect())
        .unwrap_or_else(|| {
            (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
        })
}

/// The CPUs that take the interrupts of the block device holding `dir` (empty when
/// unknown).
pub fn disk_irq_cpus(dir: &Path) -> BTreeSet<usize> {
    let Some(name) = irq_name_of(dir) else {
        return BTreeSet::new();
    };
    let Ok(interrupts) = std::fs::read_to_string("/proc/interrupts") else {
        return BTreeSet::new();
    };
    let mut cpus = BTreeSet::new();
    for irq in irqs_named(&interrupts, &name) {
        let read = |f: &str| std::fs::read_to_string(format!("/proc/irq/{irq}/{f}")).ok();
        if let Some(set) = read("effective_affinity_list")
            .or_else(|| read("smp_affinity_list"))
            .and_then(|s| parse_cpu_list(s.trim()))
        {
            cpus.extend(set);
        }
    }
    cpus
}

/// The name the disk's driver gives its interrupts ("virtio1", "nvme0"): the
/// device behind the whole disk that holds `dir`.
fn irq_name_of(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let mut block = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    if block.join("partition").exists() {
        block = block.parent()?.to_path_buf();
    }
    let device = std::fs::canonicalize(block.join("device")).ok()?;
    let name = device.file_name()?.to_str()?.to_owned();
    // NVMe namespaces sit under their controller ("nvme0"), whose queues are named
    // "nvme0q1"...; virtio disks are their own device ("virtio1-req.0").
    Some(name)
}

/// IRQ numbers of `/proc/interrupts` lines whose action names start with `name`
/// followed by `-` or `q` and a digit.
fn irqs_named(interrupts: &str, name: &str) -> Vec<u32> {
    interrupts
        .lines()
        .filter_map(|l| {
            let (num, rest) = l.trim_start().split_once(':')?;
            let irq: u32 = num.trim().parse().ok()?;
            let action = rest.split_whitespace().last()?;
            let tail = action.strip_prefix(name)?;
            let mut chars = tail.chars();
            match (chars.next(), chars.next()) {
                (Some('-'), Some(_)) => Some(irq),
                (Some('q'), Some(d)) if d.is_ascii_digit() => Some(irq),
                _ => None,
            }
        })
        .collect()
}

/// Parses a kernel CPU list ("0-3,8,10-11").
fn parse_cpu_list(s: &str) -> Option<BTreeSet<usize>> {
    let mut out = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 65_536 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(part.parse().ok()?);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERRUPTS: &str = "           CPU0       CPU1
 31:          0       5022 PCI-MSIX-0000:00:01.0   3-edge      virtio0-stats
 35:          0          1 PCI-MSIX-0000:00:02.0   0-edge      virtio1-config
 36:          0    9711833 PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0
 40:         10          0 PCI-MSIX-0000:00:03.0   0-edge      virtio10-req.0
 51:       1000          0 PCI-MSIX-0000:00:04.0   1-edge      nvme0q1
 52:          0       1000 PCI-MSIX-0000:00:04.0   2-edge      nvme0q2
NMI:          0          0   Non-maskable interrupts
";

    #[test]
    fn io_workers_go_to_the_cpus_without_a_shard() {
        let cpus = [0, 1, 2, 3];
        assert_eq!(
            io_worker_cpus(&vec![Some(0), Some(2)], &cpus),
            Some(vec![1, 3])
        );
        assert_eq!(io_worker_cpus(&vec![None, None], &cpus), None);
        assert_eq!(
            io_worker_cpus(&vec![Some(0), Some(1), Some(2), Some(3)], &cpus),
            None
        );
    }

    #[test]
    fn finds_the_disks_irqs_by_driver_name() {
        assert_eq!(irqs_named(INTERRUPTS, "virtio1"), vec![35, 36]);
        assert_eq!(irqs_named(INTERRUPTS, "nvme0"), vec![51, 52]);
        assert!(irqs_named(INTERRUPTS, "virtio2").is_empty());
    }

    #[test]
    fn parses_cpu_lists_and_rejects_junk() {
        let s = parse_cpu_list("0-3,8,10-11").unwrap();
        assert_eq!(
            s.into_iter().collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert!(parse_cpu_list("3-1").is_none());
        assert!(parse_cpu_list("x").is_none());
        assert_eq!(parse_cpu_list("").unwrap().len(), 0);
    }

    #[test]
    fn auto_keeps_shards_off_interrupt_cpus_when_it_can() {
        let cpus = [0, 1];
        let irq: BTreeSet<usize> = [1].into();
        assert_eq!(plan(PlacementMode::Auto, 0, &cpus, &irq), vec![Some(0)]);
        assert_eq!(plan(PlacementMode::Auto, 1, &cpus, &irq), vec![Some(0)]);
        // More shards than free CPUs, or nothing known: unpinned.
        assert_eq!(plan(PlacementMode::Auto, 2, &cpus, &irq), vec![None, None]);
        assert_eq!(
            plan(PlacementMode::Auto, 0, &cpus, &BTreeSet::new()),
            vec![None, None]
        );
        let all: BTreeSet<usize> = [0, 1].into();
        assert_eq!(plan(PlacementMode::Auto, 0, &cpus, &all), vec![None, None]);
        let eight: Vec<usize> = (0..8).collect();
        let irq: BTreeSet<usize> = [0, 4].into();
        assert_eq!(
            plan(PlacementMode::Auto, 0, &eight, &irq),
            vec![Some(1), Some(2), Some(3), Some(5), Some(6), Some(7)]
        );
    }

    #[test]
    fn pinned_and_unpinned_do_what_they_say() {
        let cpus = [0, 1];
        let irq: BTreeSet<usize> = [1].into();
        assert_eq!(
            plan(PlacementMode::Pinned, 0, &cpus, &irq),
            vec![Some(0), Some(1)]
        );
        assert_eq!(
            plan(PlacementMode::Pinned, 3, &cpus, &irq),
            vec![Some(0), Some(1), None]
        );
        assert_eq!(
            plan(PlacementMode::Unpinned, 0, &cpus, &irq),
            vec![None, None]
        );
    }

    #[test]
    fn this_machine_answers_without_panicking() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let irq = disk_irq_cpus(Path::new("."));
        assert!(irq.iter().all(|c| *c < 4096));
    }
}
