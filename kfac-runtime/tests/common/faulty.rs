//! A global allocator that can fail the k-th large allocation (at least
//! [`LARGE`] bytes) from the moment it is armed: how tests run out of
//! memory at every large allocation of an operation in turn,
//! deterministically. A test binary installs it with
//! `#[global_allocator] static A: faulty::Faulty = faulty::Faulty;`.
//!
//! Allocations of at least [`MAPPED`] bytes are mapped with `mmap` of
//! their own and unmapped on free, whatever the thread: an address-space
//! limit (`RLIMIT_AS`) then refuses every large allocation that does not
//! fit. Through glibc's malloc it may not: a thread with an arena of its
//! own falls back to the arena's reserved (already counted) heap when
//! `mmap` fails, and whether the test thread has one depends on the
//! machine, so a limit test that passed on one machine failed on another.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

pub const LARGE: usize = 16 << 10;
/// Allocations of at least this size get a mapping of their own.
pub const MAPPED: usize = 128 << 10;
const PAGE: usize = 4096;
static ARMED: AtomicBool = AtomicBool::new(false);
static FIRED: AtomicBool = AtomicBool::new(false);
static COUNTDOWN: AtomicUsize = AtomicUsize::new(0);

pub struct Faulty;

impl Faulty {
    fn fail(size: usize) -> bool {
        if size < LARGE || !ARMED.load(SeqCst) {
            return false;
        }
        // The gemm crate's per-thread slab (an L2 cache's size, a power of
        // two of 1 MiB or more) is allocated on a thread's first product
        // and aborts on failure by design (see kfac-runtime's `mem.rs`):
        // never failed here. The engine's own buffers in these tests are
        // smaller.
        if size >= 1 << 20 && size.is_power_of_two() {
            return false;
        }
        if COUNTDOWN.fetch_sub(1, SeqCst) == 0 {
            ARMED.store(false, SeqCst);
            FIRED.store(true, SeqCst);
            return true;
        }
        false
    }
}

fn mapped(size: usize, align: usize) -> bool {
    size >= MAPPED && align <= PAGE
}

/// # Safety
/// `l` has a non-zero size (the `GlobalAlloc::alloc` contract).
unsafe fn raw_alloc(l: Layout, zeroed: bool) -> *mut u8 {
    if mapped(l.size(), l.align()) {
        // SAFETY: an anonymous private mapping of a non-zero length; its
        // pages are zeroed and page-aligned (align <= PAGE).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                l.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        return if p == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            p.cast()
        };
    }
    // SAFETY: forwarded with the caller's layout.
    unsafe {
        if zeroed {
            System.alloc_zeroed(l)
        } else {
            System.alloc(l)
        }
    }
}

/// # Safety
/// `ptr` came from [`raw_alloc`] with layout `l`.
unsafe fn raw_dealloc(ptr: *mut u8, l: Layout) {
    if mapped(l.size(), l.align()) {
        // SAFETY: `ptr` is a mapping of `l.size()` bytes made by raw_alloc
        // (the same size and alignment decide both ways).
        unsafe { libc::munmap(ptr.cast(), l.size()) };
    } else {
        // SAFETY: allocated by System with this layout.
        unsafe { System.dealloc(ptr, l) }
    }
}

// SAFETY: every call is served by the system allocator or by a mapping of
// its own (page-aligned, at least the requested size, unmapped only by
// dealloc with the same layout), or fails (null), which the GlobalAlloc
// contract allows.
unsafe impl GlobalAlloc for Faulty {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if Self::fail(l.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout (non-zero size).
        unsafe { raw_alloc(l, false) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if Self::fail(l.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout (non-zero size).
        unsafe { raw_alloc(l, true) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() && Self::fail(new) {
            return std::ptr::null_mut();
        }
        if !mapped(l.size(), l.align()) && !mapped(new, l.align()) {
            // SAFETY: forwarded with the caller's pointer and layout.
            return unsafe { System.realloc(ptr, l, new) };
        }
        // SAFETY: `new` is non-zero and, rounded to `l.align()`, does not
        // overflow isize (the realloc contract).
        let nl = unsafe { Layout::from_size_align_unchecked(new, l.align()) };
        // SAFETY: a non-zero layout.
        let q = unsafe { raw_alloc(nl, false) };
        if !q.is_null() {
            // SAFETY: both blocks are live, distinct and hold at least the
            // copied length; the old one is then freed with its layout.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, q, l.size().min(new));
                raw_dealloc(ptr, l);
            }
        }
        q
    }
    unsafe fn dealloc(&self, ptr: *mut u8, l: Layout) {
        // SAFETY: allocated by this allocator with this layout.
        unsafe { raw_dealloc(ptr, l) }
    }
}

/// Fails the `k`-th large allocation from now on (0: the next).
pub fn arm(k: usize) {
    FIRED.store(false, SeqCst);
    COUNTDOWN.store(k, SeqCst);
    ARMED.store(true, SeqCst);
}

/// Disarms; whether an allocation was failed since [`arm`].
pub fn disarm() -> bool {
    ARMED.store(false, SeqCst);
    FIRED.load(SeqCst)
}
