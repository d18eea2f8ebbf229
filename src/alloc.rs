//! The process's allocator: mimalloc, called the way C's `malloc` is called.
//!
//! The merge path allocates and frees many small values per change; mimalloc serves
//! that pattern faster than glibc's allocator (BENCHMARKS.md). It is built with
//! transparent huge pages off for the process (the `no_thp` feature of
//! `libmimalloc-sys`): with them, every batch-sized buffer that lands on memory the
//! allocator had returned to the kernel faulted in and zeroed a whole 2 MiB page, which
//! cost CPU per change and inflated RSS. `MIMALLOC_ALLOW_THP=1` in the environment
//! turns them back on.
//!
//! Every block mimalloc hands out from `mi_malloc` is aligned to at least the word size
//! (its size classes are multiples of it and its blocks start at aligned offsets), so
//! a request whose alignment is the word size or less is a plain `mi_malloc`. Only
//! wider alignments go through `mi_malloc_aligned`: for a block that is not a power of
//! two in size (a 1,500-byte string, a redb page of a B-tree leaf being built),
//! mimalloc's aligned entry point cannot prove the alignment from the size class and
//! over-allocates on a slow path, which was a few percent of a captured change's
//! instructions.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every `mi_malloc` block has: the word size.
const PLAIN_ALIGN: usize = std::mem::size_of::<usize>();

/// mimalloc as the global allocator (see the module doc).
pub struct Allocator;

// SAFETY: every method forwards to mimalloc, which returns null on failure and blocks
// of at least the requested size; blocks are aligned to `layout.align()` either because
// the alignment is at most `PLAIN_ALIGN` (see the module doc) or because the aligned
// entry point was asked for it. `mi_free` and `mi_realloc` accept blocks from either
// entry point.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding to mimalloc; see the impl's comment.
        unsafe {
            if layout.align() <= PLAIN_ALIGN {
                mi::mi_malloc(layout.size()) as *mut u8
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding to mimalloc; see the impl's comment.
        unsafe {
            if layout.align() <= PLAIN_ALIGN {
                mi::mi_zalloc(layout.size()) as *mut u8
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator; see the impl's comment.
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator; see the impl's comment.
        unsafe {
            if layout.align() <= PLAIN_ALIGN {
                mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size a Rust value of each alignment can have, small and large, comes back
    /// aligned, writable over its whole size, and survives growing and shrinking.
    #[test]
    fn blocks_are_aligned_for_every_size_and_alignment() {
        let a = Allocator;
        let mut sizes: Vec<usize> = (1..=1100).collect();
        sizes.extend([1500, 4095, 4096, 4097, 10_000, 65_536, 100_003, 1 << 20, 3 << 20]);
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            // Sizes below the alignment too: a layout's size need not be a multiple of it.
            for &size in &sizes {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: a non-zero size; every block is freed with its own layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null(), "size {size} align {align}");
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xAB, size);
                    let z = a.alloc_zeroed(layout);
                    assert!(!z.is_null(), "zeroed size {size} align {align}");
                    assert_eq!(z as usize % align, 0, "zeroed size {size} align {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                    let grown = (size * 3).next_multiple_of(align);
                    let q = a.realloc(p, layout, grown);
                    assert!(!q.is_null(), "grown size {size} align {align}");
                    assert_eq!(q as usize % align, 0, "grown size {size} align {align}");
                    assert!(std::slice::from_raw_parts(q, size).iter().all(|&b| b == 0xAB));
                    let grown_layout = Layout::from_size_align(grown, align).expect("layout");
                    let r = a.realloc(q, grown_layout, size);
                    assert!(!r.is_null(), "shrunk size {size} align {align}");
                    assert_eq!(r as usize % align, 0, "shrunk size {size} align {align}");
                    assert!(std::slice::from_raw_parts(r, size).iter().all(|&b| b == 0xAB));
                    a.dealloc(r, layout);
                }
            }
        }
    }
}
