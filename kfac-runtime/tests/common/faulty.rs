//! A global allocator that can fail the k-th large allocation (at least
//! [`LARGE`] bytes) from the moment it is armed: how tests run out of
//! memory at every large allocation of an operation in turn,
//! deterministically. A test binary installs it with
//! `#[global_allocator] static A: faulty::Faulty = faulty::Faulty;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

pub const LARGE: usize = 16 << 10;
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

// SAFETY: every call is forwarded to the system allocator unchanged,
// or fails (null), which the GlobalAlloc contract allows.
unsafe impl GlobalAlloc for Faulty {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if Self::fail(l.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if Self::fail(l.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() && Self::fail(new) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.realloc(ptr, l, new) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, l: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, l) }
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
