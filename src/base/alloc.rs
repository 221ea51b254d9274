//! The binary's global allocator: the system's (glibc's, tuned by `util::tune_allocator`), with
//! every large allocation's memory made eligible for transparent huge pages.
//!
//! Why: a decoding step streams every weight block from memory (96 MB per token for
//! SmolLM2-135M Q4_1). On 4 KiB pages the CPU's prefetchers stop at each page boundary and the
//! TLB misses every 4 KiB; on 2 MiB pages the same kernels drew ~8% more tokens per second
//! (docs/PERFORMANCE.md, "Huge pages"). Linux's default policy, `madvise`, gives huge pages only
//! to memory that asks for them, which is what this does: `madvise(MADV_HUGEPAGE)` over the
//! 2 MiB-aligned span around each allocation of at least [`HUGE_MIN`] bytes, before the caller
//! touches it (glibc's `glibc.malloc.hugetlb=1` tunable does the same for its heaps, but a
//! tunable is read from the environment before `main` runs). Small allocations are left alone,
//! and a kernel without transparent huge pages ignores the advice (errors are not fatal: the
//! memory is valid either way).

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations from this size on ask for huge pages: the weight matrices of a small model
/// (192 KiB and up), activations and gradients of training, KV caches; not the many small
/// buffers of per-token ops.
pub const HUGE_MIN: usize = 128 * 1024;

/// The huge page size of x86-64 and of aarch64 with 4 KiB base pages.
const HUGE_PAGE: usize = 2 << 20;

/// `System`, with [`HUGE_MIN`]-and-larger allocations advised onto huge pages.
pub struct HugePageAlloc;

/// Ask for huge pages over the 2 MiB-aligned span that holds `len` bytes at `p`. The span may
/// reach past the allocation (neighbouring heap memory, or addresses not mapped at all, for
/// which Linux advises the mapped parts and reports ENOMEM); the advice changes only which page
/// size later faults in that span get, never contents or validity.
fn advise(p: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let start = (p as usize) & !(HUGE_PAGE - 1);
        let end = (p as usize).saturating_add(len).next_multiple_of(HUGE_PAGE);
        // SAFETY: madvise with MADV_HUGEPAGE reads no memory and changes no mapping's contents
        // or protection; it only marks the span's mappings as eligible for huge pages.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, len);
}

// SAFETY: every call is forwarded to `System` with the caller's layout unchanged; `advise`
// touches no memory, so the contract of each method is System's.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's (non-zero-sized) layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && layout.size() >= HUGE_MIN {
            advise(p, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && layout.size() >= HUGE_MIN {
            advise(p, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from System, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as in `dealloc`; new_size is the caller's, checked by the caller.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && new_size >= HUGE_MIN {
            advise(p, new_size);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_through_it_hold_what_is_written() {
        let a = HugePageAlloc;
        for size in [16, HUGE_MIN - 1, HUGE_MIN, 5 << 20] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            // SAFETY: non-zero layout; the buffer is written and read within its size, then
            // reallocated and freed with the layouts it has.
            unsafe {
                let z = a.alloc_zeroed(layout);
                assert!(!z.is_null());
                assert!((0..size).step_by(4093).all(|i| *z.add(i) == 0), "alloc_zeroed gave non-zero memory");
                a.dealloc(z, layout);
                let p = a.alloc(layout);
                assert!(!p.is_null());
                for i in (0..size).step_by(997) {
                    *p.add(i) = (i % 251) as u8;
                }
                let q = a.realloc(p, layout, size * 2);
                assert!(!q.is_null());
                assert!((0..size).step_by(997).all(|i| *q.add(i) == (i % 251) as u8), "realloc lost contents");
                a.dealloc(q, Layout::from_size_align(size * 2, 64).unwrap());
            }
        }
    }
}
