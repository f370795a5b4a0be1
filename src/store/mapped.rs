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
//! The file is mapped a window at a time, so a response maps at most two [`MAP_WINDOW`]s at once
//! (hyper asks for the next frame before the current one is fully written) and resident memory
//! stays small however large the blob is. A window that is not all in the page cache is faulted
//! in on the blocking pool first (`mincore` tells), so a store larger than memory never makes a
//! runtime thread wait for the disk.
#![allow(unsafe_code)]

use std::fs::File;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use memmap2::{Advice, Mmap, MmapOptions};
use tokio::task::JoinHandle;

use super::Lease;

/// Bytes mapped per body frame.
pub const MAP_WINDOW: usize = 2 << 20;

/// Streams `[offset, end)` of a committed blob file as mapped windows.
pub struct MappedChunks {
    file: Arc<File>,
    next: u64,
    end: u64,
    /// Bytes not yet handed to hyper.
    remaining: u64,
    /// The first window, mapped by `new` to find out early whether the file can be mapped at all
    /// (or the shared mapping of a small blob).
    first: Option<Bytes>,
    /// A window whose pages are being read in from disk on the blocking pool.
    faulting: Option<JoinHandle<Bytes>>,
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
        let mut body = Self {
            file,
            next: offset.min(end),
            end,
            remaining: end.saturating_sub(offset),
            first: None,
            faulting: None,
            lease: None,
        };
        if body.next < body.end {
            body.first = Some(Bytes::from_owner(body.map_next()?));
        }
        Ok(body)
    }

    /// `[offset, end)` of a small blob mapped once for every response (see [`SharedMap`]).
    pub fn from_shared(map: SharedMap, offset: u64, end: u64) -> Self {
        let (start, end) = (offset.min(end) as usize, end as usize);
        Self {
            file: Arc::clone(&map.file),
            next: end as u64,
            end: end as u64,
            remaining: (end - start) as u64,
            first: (start < end).then(|| Bytes::from_owner(map).slice(start..end)),
            faulting: None,
            lease: None,
        }
    }

    /// Keeps `lease` (and so the entry) until the body is dropped.
    pub fn with_lease(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Maps the next window and moves past it.
    fn map_next(&mut self) -> io::Result<Mmap> {
        let len = (self.end - self.next).min(MAP_WINDOW as u64) as usize;
        // SAFETY: a mapping is only unsound if the file changes while mapped. Blob files are
        // content-addressed and immutable: they are written under tmp/, verified, fsynced and
        // renamed into place, and gantry only ever unlinks them (eviction, `gc --verify`) or
        // renames an identical file over them, which leaves existing mappings intact. `new`
        // checked that the file covers every mapped byte. What can still fault is outside this
        // contract: someone truncating or rewriting files under storage.path by hand, or a disk
        // read error on a mapped page; either kills the process with SIGBUS (SECURITY.md).
        let map = unsafe {
            MmapOptions::new()
                .offset(self.next)
                .len(len)
                .map(&*self.file)?
        };
        // Start read-ahead of the whole window now, should the page cache not have it.
        let _ = map.advise(Advice::WillNeed);
        self.next += len as u64;
        Ok(map)
    }

    fn hand_out(&mut self, window: Bytes) -> Frame<Bytes> {
        self.remaining -= window.len() as u64;
        Frame::data(window)
    }
}

/// Whether every page of `map` (part of a live mapping) is in the page cache (on error: assume not).
pub(super) fn resident(map: &[u8]) -> bool {
    let page = page_size();
    let start = map.as_ptr() as usize;
    let aligned = start - start % page;
    let len = map.len() + (start - aligned);
    let mut pages = vec![0u8; len.div_ceil(page)];
    // SAFETY: [aligned, aligned + len) lies within the live mapping `map` comes from (memmap2
    // maps from the page boundary below the requested offset), and `pages` has one byte per page
    // of it.
    let status = unsafe { libc::mincore(aligned as *mut libc::c_void, len, pages.as_mut_ptr()) };
    status == 0 && pages.iter().all(|page| page & 1 == 1)
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as usize,
        _ => 4096,
    })
}

/// Reads one byte of every page, so the disk reads happen on the calling (blocking) thread.
fn fault_in(window: &[u8]) {
    for offset in (0..window.len()).step_by(page_size()) {
        std::hint::black_box(window[offset]);
    }
}

/// A whole small blob file, mapped once and shared by every response that serves it: a hot
/// small blob then costs no `mmap`, `munmap` (with its TLB shootdowns) or page faults per request,
/// which were ~15% of gantry's CPU time on warm 1 MiB blobs.
#[derive(Clone)]
pub struct SharedMap {
    map: Arc<Mmap>,
    /// Kept so a body built from the map has a file handle like any other.
    file: Arc<File>,
}

impl SharedMap {
    /// Maps the first `size` bytes of a committed blob file (`0 < size`).
    pub fn new(file: Arc<File>, size: u64) -> io::Result<Self> {
        if file.metadata()?.len() < size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file is shorter than the blob",
            ));
        }
        let len = usize::try_from(size).map_err(io::Error::other)?;
        // SAFETY: as in `MappedChunks::map_next`: committed blob files never change, and the file
        // was just checked to cover the mapping.
        let map = unsafe { MmapOptions::new().len(len).map(&*file)? };
        let _ = map.advise(Advice::WillNeed);
        Ok(Self {
            map: Arc::new(map),
            file,
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Body for MappedChunks {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(faulting) = self.faulting.as_mut() {
            let faulted = ready!(Pin::new(faulting).poll(cx));
            self.faulting = None;
            return Poll::Ready(Some(match faulted {
                Ok(window) => Ok(self.hand_out(window)),
                Err(join) => Err(io::Error::other(join)),
            }));
        }
        let window = match self.first.take() {
            Some(window) => window,
            None if self.next >= self.end => return Poll::Ready(None),
            None => match self.map_next() {
                Ok(map) => Bytes::from_owner(map),
                Err(error) => return Poll::Ready(Some(Err(error))),
            },
        };
        if resident(&window) {
            return Poll::Ready(Some(Ok(self.hand_out(window))));
        }
        self.faulting = Some(tokio::task::spawn_blocking(move || {
            fault_in(&window);
            window
        }));
        self.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
/// Drops a clean file's pages from the page cache, so tests can serve a window from disk.
pub(super) fn evict_from_page_cache(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its arguments; the descriptor is open.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) == 0 }
}

#[cfg(test)]
/// Maps part of a test's file without read-ahead advice, to look at the page cache as it is.
pub(super) fn map_unadvised(file: &File, offset: u64, len: usize) -> Mmap {
    // SAFETY: the test's own file, not changed while mapped.
    unsafe { MmapOptions::new().offset(offset).len(len).map(file) }.expect("map")
}
