//! The io_uring backend (glommio `DmaFile`) and the group-commit driver that runs a
//! partition's flushes on a glommio executor.
//!
//! This module is one of the three places that import glommio (with the runtime
//! bootstrap and the network layer), so swapping the runtime touches only them.

use crate::storage::io::{LogIo, WriteBuf};
use crate::storage::partition::{flush_shared, FlushDue, Partition};
use crate::storage::watermark::Watermark;
use crate::storage::StorageError;
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

impl WriteBuf for DmaBuffer {
    fn as_slice(&self) -> &[u8] {
        self.as_bytes()
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.as_bytes_mut()
    }
}

/// io_uring writes and fdatasync through glommio. Must be created and used on a
/// glommio executor thread.
#[derive(Clone)]
pub struct UringIo {
    /// Any DMA file of this executor: glommio allocates DMA buffers (from its
    /// registered pool when it can) through a file handle.
    allocator: Rc<DmaFile>,
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UringIo")
    }
}

impl UringIo {
    /// Opens the backend; `dir` receives a small `.dma-alloc` file used only to
    /// reach glommio's buffer allocator.
    pub async fn new(dir: &Path) -> io::Result<UringIo> {
        std::fs::create_dir_all(dir)?;
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .read(true)
            .dma_open(dir.join(".dma-alloc"))
            .await?;
        Ok(UringIo {
            allocator: Rc::new(f),
        })
    }
}

impl LogIo for UringIo {
    type File = DmaFile;
    type Buf = DmaBuffer;

    fn alloc(&self, len: usize) -> DmaBuffer {
        self.allocator.alloc_dma_buffer(len)
    }

    fn open(&self, path: &Path) -> impl Future<Output = io::Result<DmaFile>> {
        let path = path.to_owned();
        async move { Ok(OpenOptions::new().write(true).dma_open(&path).await?) }
    }

    fn write_at(
        &self,
        file: &DmaFile,
        mut buf: DmaBuffer,
        len: usize,
        pos: u64,
    ) -> impl Future<Output = io::Result<()>> {
        buf.trim_to_size(len);
        async move {
            let n = file.write_at(buf, pos).await?;
            if n != len {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {n} of {len} bytes at {pos}"),
                ));
            }
            Ok(())
        }
    }

    async fn sync_data(&self, file: &DmaFile) -> io::Result<()> {
        Ok(file.fdatasync().await?)
    }
}

/// The group-commit loop for one partition: flushes when `flush_bytes` are pending
/// or the oldest pending byte has waited `flush_delay_us`, whichever comes first,
/// waking acknowledgement waiters as the watermarks advance. Returns after a final
/// flush once `stop` reaches 1, or with the error that fenced the partition.
pub async fn group_commit<B: LogIo>(
    part: Rc<RefCell<Partition<B>>>,
    stop: Watermark,
) -> Result<(), StorageError> {
    let (appended, kicks) = {
        let p = part.borrow();
        (p.appended_watch(), p.flush_kick_watch())
    };
    let stopped = || async {
        stop.wait_for(1).await.ok();
    };
    loop {
        if stop.get() >= 1 {
            while flush_shared(&part).await? {}
            return Ok(());
        }
        let due = part.borrow().flush_due(Instant::now());
        match due {
            FlushDue::Idle => {
                let next = appended.get() + 1;
                futures_lite::future::or(
                    async {
                        appended.wait_for(next).await.ok();
                    },
                    stopped(),
                )
                .await;
            }
            FlushDue::At(at) => {
                let kick = kicks.get() + 1;
                let wait = at.saturating_duration_since(Instant::now());
                futures_lite::future::or(
                    futures_lite::future::or(glommio::timer::sleep(wait), async {
                        kicks.wait_for(kick).await.ok();
                    }),
                    stopped(),
                )
                .await;
            }
            FlushDue::Now => {
                flush_shared(&part).await?;
            }
        }
    }
}
