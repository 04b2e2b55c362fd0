//! Zero-filled arrays taken straight from the kernel (`mmap` of anonymous memory), for the large
//! per-shard arrays that are mostly never written: the read buffer and the `epoll_wait` event
//! array.
//!
//! Why not `vec![0; n]`: below glibc's mmap threshold (128 KiB) `calloc` carves the array out of
//! a malloc arena and clears it with `memset`, which makes every page resident at once: a 64 KiB
//! read buffer costs an idle shard 64 KiB. A fresh anonymous mapping is zero by definition and a
//! page becomes resident only when it is first written (a read maps the shared zero page), so
//! an idle shard costs nothing here and a busy one only the pages its largest read reached.
//!
//! Owned by whoever holds the [`Zeroed`] (a shard's thread); the memory is unmapped on drop.
#![allow(unsafe_code)]

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

mod sealed {
    /// Types for which every bit pattern of zero bytes is a valid value, with no drop glue.
    pub trait AllZeroValid: Copy + 'static {}
    impl AllZeroValid for u8 {}
    impl AllZeroValid for u32 {}
    // `#[repr(transparent)]` over `libc::epoll_event` (a u32 and a u64): zero is "no events,
    // token 0".
    impl AllZeroValid for nix::sys::epoll::EpollEvent {}
}

pub use sealed::AllZeroValid;

/// `len` zeroed values of `T`, resident only where written.
pub struct Zeroed<T: AllZeroValid> {
    storage: Storage<T>,
    len: usize,
}

enum Storage<T> {
    /// Our own anonymous mapping of `bytes` bytes.
    Mapped { ptr: NonNull<T>, bytes: usize },
    /// `mmap` failed (or `len` is 0): an ordinary allocation, whose failure aborts like any.
    Heap(Box<[T]>),
}

// SAFETY: a `Zeroed` owns its mapping exclusively (no other pointer to it exists), like a
// `Box<[T]>`; `T` is plain data, so moving the owner to another thread is sound.
unsafe impl<T: AllZeroValid + Send> Send for Zeroed<T> {}
// SAFETY: shared access only hands out `&[T]`, as `Box<[T]>` does.
unsafe impl<T: AllZeroValid + Sync> Sync for Zeroed<T> {}

impl<T: AllZeroValid> Zeroed<T> {
    /// `len` values, all zero bytes.
    pub fn new(len: usize) -> Self {
        let bytes = len.saturating_mul(std::mem::size_of::<T>());
        if bytes > 0 {
            // SAFETY: an anonymous private mapping at an address of the kernel's choosing
            // touches no existing memory; the result is checked before use.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                if let Some(ptr) = NonNull::new(p.cast::<T>()) {
                    return Zeroed {
                        storage: Storage::Mapped { ptr, bytes },
                        len,
                    };
                }
            }
        }
        Zeroed {
            storage: Storage::Heap(zeroed_box(len)),
            len,
        }
    }

    /// Whether the memory is a mapping of its own (false: the heap fallback).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }
}

/// The heap fallback, built from zero bytes without naming a value of `T`.
fn zeroed_box<T: AllZeroValid>(len: usize) -> Box<[T]> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; `write_bytes` makes every one of the `len` values all zero
    // bytes, a valid `T` (AllZeroValid), before `set_len` exposes them.
    unsafe {
        std::ptr::write_bytes(v.as_mut_ptr(), 0, len);
        v.set_len(len);
    }
    v.into_boxed_slice()
}

/// An empty array (no memory), so a buffer can be taken out of its owner for a call and put back.
impl<T: AllZeroValid> Default for Zeroed<T> {
    fn default() -> Self {
        Zeroed::new(0)
    }
}

impl<T: AllZeroValid> Deref for Zeroed<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.storage {
            // SAFETY: the mapping holds `len` properly aligned (page-aligned) values of `T`,
            // zero-initialised by the kernel or written through `deref_mut`, and lives as long
            // as `self`.
            Storage::Mapped { ptr, .. } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), self.len)
            },
            Storage::Heap(b) => b,
        }
    }
}

impl<T: AllZeroValid> DerefMut for Zeroed<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.storage {
            // SAFETY: as in `deref`; `&mut self` makes this the only reference.
            Storage::Mapped { ptr, .. } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), self.len)
            },
            Storage::Heap(b) => b,
        }
    }
}

impl<T: AllZeroValid> Drop for Zeroed<T> {
    fn drop(&mut self) {
        if let Storage::Mapped { ptr, bytes } = self.storage {
            // SAFETY: the mapping was made by `new` with this address and length and is
            // unmapped once; no reference into it outlives `self`.
            unsafe {
                libc::munmap(ptr.as_ptr().cast(), bytes);
            }
        }
    }
}

impl<T: AllZeroValid + std::fmt::Debug> std::fmt::Debug for Zeroed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zeroed")
            .field("len", &self.len)
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_writable_and_sized() {
        let mut b = Zeroed::<u8>::new(100_000);
        assert!(b.is_mapped());
        assert_eq!(b.len(), 100_000);
        assert!(b.iter().all(|&x| x == 0));
        b[99_999] = 7;
        b[0] = 1;
        assert_eq!((b[0], b[99_999]), (1, 7));
        let e = Zeroed::<nix::sys::epoll::EpollEvent>::new(3);
        assert_eq!(e.len(), 3);
        assert_eq!(e[2].data(), 0);
        let none = Zeroed::<u32>::new(0);
        assert!(none.is_empty() && !none.is_mapped());
    }

    #[test]
    fn untouched_pages_are_not_resident() {
        fn anon_kib() -> u64 {
            let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
            s.lines()
                .find_map(|l| l.strip_prefix("Anonymous:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        }
        if anon_kib() == 0 {
            return; // no smaps_rollup (an old kernel): nothing to check
        }
        // 64 MiB mapped, one byte written: resident memory grows by a page, not 64 MiB. Other
        // test threads allocate meanwhile, hence the wide margin.
        let before = anon_kib();
        let mut b = Zeroed::<u8>::new(64 << 20);
        b[12345] = 1;
        let grown = anon_kib().saturating_sub(before);
        assert!(grown < 16 << 10, "64 MiB mapping made {grown} KiB resident");
        drop(b);
    }
}
