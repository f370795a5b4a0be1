//! A response body that hands out a committed blob's bytes as memory mappings of its file.
//!
//! This is gantry's `sendfile`: the kernel copies from the page cache into the socket once, as it
//! would for a buffer, but there is no `read` copy into a fresh buffer before that, no page faults
//! of new heap memory, and no hop to the blocking pool per chunk. Those were about half of gantry's
//! CPU time on warm blobs; measured on the project's 2-core machine (docs/performance.md), mapping
//! took warm 1 MiB blobs from ~2,200 to ~3,300 req/s (nginx with `sendfile`: ~2,900-3,200) and a
//! 1 MiB body alone from 170 to 95 us (`cargo bench --bench hot_paths -- warm_blob`). That is the
//! measurement behind this module's `unsafe`.
//!
//! The file is mapped a window at a time, so a response maps at most [`MAP_WINDOW`] bytes at once
//! and resident memory stays small however large the blob is.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use memmap2::{Advice, MmapOptions};

use super::Lease;

/// Bytes mapped per body frame.
pub const MAP_WINDOW: usize = 2 << 20;

/// Streams `[offset, end)` of a committed blob file as mapped windows.
pub struct MappedChunks {
    file: Arc<File>,
    next: u64,
    end: u64,
    /// Keeps the entry from eviction while it is being sent.
    lease: Option<Lease>,
}

impl MappedChunks {
    /// Fails when the file is shorter than `end` (a damaged store: mapping past the end of a file
    /// would fault on access) or cannot be mapped at all (some filesystems do not support it);
    /// the caller then reads it instead.
    pub fn new(file: Arc<File>, offset: u64, end: u64) -> io::Result<Self> {
        let length = file.metadata()?.len();
        if length < end {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file is shorter than the blob",
            ));
        }
        let body = Self {
            file,
            next: offset.min(end),
            end,
            lease: None,
        };
        if body.next < body.end {
            // Probe once, so an unmappable file is found before any byte is sent.
            body.map(body.next, 1)?;
        }
        Ok(body)
    }

    /// Keeps `lease` (and so the entry) until the body is dropped.
    pub fn with_lease(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    fn map(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        // SAFETY: a mapping is only unsound if the file changes while mapped. Blob files are
        // content-addressed and immutable: they are written under tmp/, verified, fsynced and
        // renamed into place, and gantry only ever unlinks them (eviction, `gc --verify`), which
        // leaves existing mappings intact. `new` checked that the file covers every mapped byte.
        // Only someone truncating files inside storage.path by hand could break this (SIGBUS).
        let map = unsafe {
            MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(&*self.file)?
        };
        // Start read-ahead of the whole window now, should the page cache not have it.
        let _ = map.advise(Advice::WillNeed);
        Ok(Bytes::from_owner(map))
    }
}

impl Body for MappedChunks {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.next >= self.end {
            return Poll::Ready(None);
        }
        let len = (self.end - self.next).min(MAP_WINDOW as u64) as usize;
        let chunk = self.map(self.next, len);
        self.next += len as u64;
        Poll::Ready(Some(chunk.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.next)
    }
}
