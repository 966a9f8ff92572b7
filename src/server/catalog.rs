//! The topic catalog: names, partition counts and per-topic settings, persisted as
//! `catalog.json` in the data directory (written to a temporary file, fsynced, then
//! renamed, so a crash leaves the old or the new catalog, never a torn one).
//!
//! Shard 0 owns the file; every shard keeps a copy to route requests.

use crate::protocol::{validate_topic_name, TopicConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Catalog {
    pub topics: BTreeMap<String, TopicConfig>,
}

pub fn catalog_path(data_dir: &Path) -> PathBuf {
    data_dir.join("catalog.json")
}

/// Where a topic's partition lives.
pub fn partition_dir(data_dir: &Path, topic: &str, partition: u32) -> PathBuf {
    data_dir
        .join("topics")
        .join(topic)
        .join(partition.to_string())
}

pub fn topic_dir(data_dir: &Path, topic: &str) -> PathBuf {
    data_dir.join("topics").join(topic)
}

impl Catalog {
    pub fn load(data_dir: &Path) -> anyhow::Result<Catalog> {
        let p = catalog_path(data_dir);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Catalog::default()),
            Err(e) => return Err(anyhow::anyhow!("read {}: {e}", p.display())),
        };
        let c: Catalog = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("parse {}: {e}", p.display()))?;
        for (name, cfg) in &c.topics {
            validate_topic_name(name).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            crate::protocol::validate_topic_config(cfg)
                .map_err(|e| anyhow::anyhow!("{}: topic {name}: {e}", p.display()))?;
        }
        Ok(c)
    }

    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        let p = catalog_path(data_dir);
        let tmp = data_dir.join("catalog.json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &p)?;
        crate::storage::io::sync_dir(data_dir)
    }
}
