//! A per-thread cache of 8 KiB blocks in front of the system allocator: the
//! blocks hyper's read buffers are made of, allocated and freed twice per
//! request on each hop.
//!
//! Why they come and go: hyper splits a message's head off its connection's
//! read buffer and keeps the header values pointing into it. Its next read
//! (to notice a client closing while its request is in flight, or an upstream
//! closing once its answer is in) then finds the buffer shared and allocates
//! a fresh 8 KiB one (`BytesMut::reserve`); the old one is freed when the
//! message is dropped. glibc serves 8 KiB from its bins, not from its
//! per-thread cache (which stops at about 1 KiB), and first merges its fast
//! bins (`malloc_consolidate`): about 700 instructions per request and hop,
//! and with a filter's 100k locks streaming through the CPU's cache, half the
//! last-level misses of a write (`bench/README.md`). nginx keeps its buffers
//! in pools; mimalloc, which also recycles such blocks per thread, cost 62%
//! more memory per lock and was dropped. This keeps only that one size.
//!
//! Only threads that run an event loop keep blocks ([`enable`]): they live as
//! long as their loop, and give their blocks back when it ends ([`drain`]).
//! Any other thread (tokio's blocking pool comes and goes) passes straight
//! through, so no thread ends holding blocks that nobody can free. A block
//! freed on another loop's thread joins that thread's list: every block came
//! from `malloc`, so any thread may hand it out or free it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;

/// The size cached: hyper's read buffer (`INIT_BUFFER_SIZE`), which it
/// reserves whole whenever less than that is left.
pub const BLOCK: usize = 8192;

/// At most this many blocks kept per thread (128 KiB): a loop needs about two
/// per connection with a request in flight, and what is over goes back to
/// `malloc`, which would have held it in its bins anyway.
const CAP: u32 = 16;

/// The most alignment a cached block may be asked for: `malloc` gives every
/// block at least a pointer's alignment on every platform, and Rust's
/// `System` uses plain `malloc` for such layouts.
const ALIGN: usize = std::mem::align_of::<usize>();

/// A thread's list: free blocks chained through their first word.
#[derive(Clone, Copy)]
struct List {
    head: *mut u8,
    len: u32,
    on: bool,
}

thread_local! {
    // `const` and a `Copy` type without `Drop`: reading it never allocates
    // and never registers a destructor, which an allocator must not do.
    static LIST: Cell<List> = const { Cell::new(List { head: ptr::null_mut(), len: 0, on: false }) };
}

/// The global allocator of the `fencegate` binary: [`System`], with 8 KiB
/// blocks kept per event-loop thread.
pub struct BlockCache;

fn cached(layout: &Layout) -> bool {
    layout.size() == BLOCK && layout.align() <= ALIGN
}

/// Starts keeping blocks on this thread. Call it on threads that live as
/// long as their event loop, and [`drain`] when the loop ends.
pub fn enable() {
    LIST.with(|l| l.set(List { on: true, ..l.get() }));
}

/// Stops keeping blocks on this thread and frees those it kept.
pub fn drain() {
    let mut list = LIST.with(|l| l.replace(List { head: ptr::null_mut(), len: 0, on: false }));
    while !list.head.is_null() {
        let block = list.head;
        // SAFETY: every block on the list is a live `malloc` block of BLOCK
        // bytes whose first word holds the next one (`push`).
        unsafe {
            list.head = block.cast::<*mut u8>().read();
            System.dealloc(block, Layout::from_size_align_unchecked(BLOCK, 1));
        }
    }
}

/// How many blocks this thread keeps now (for tests and the curious).
pub fn kept() -> usize {
    LIST.with(|l| l.get().len as usize)
}

fn pop() -> *mut u8 {
    LIST.with(|l| {
        let mut list = l.get();
        if list.head.is_null() {
            return ptr::null_mut();
        }
        let block = list.head;
        // SAFETY: as in `drain`.
        list.head = unsafe { block.cast::<*mut u8>().read() };
        list.len -= 1;
        l.set(list);
        block
    })
}

/// Keeps `block` if this thread keeps blocks and has room; false otherwise.
fn push(block: *mut u8) -> bool {
    LIST.with(|l| {
        let mut list = l.get();
        if !list.on || list.len >= CAP {
            return false;
        }
        // SAFETY: `block` is a freed BLOCK-byte `malloc` block, aligned for a
        // pointer; its first word is ours until it is handed out again.
        unsafe { block.cast::<*mut u8>().write(list.head) };
        list.head = block;
        list.len += 1;
        l.set(list);
        true
    })
}

// SAFETY: every pointer handed out is either `System`'s own answer or a block
// that `System` gave for a layout of BLOCK bytes and at most ALIGN alignment
// (a `malloc` block), freed since, which satisfies any such layout; each block is on at most one
// list (it is pushed once per free and popped once per allocation).
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if cached(&layout) {
            let block = pop();
            if !block.is_null() {
                return block;
            }
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if cached(&layout) {
            let block = pop();
            if !block.is_null() {
                block.write_bytes(0, BLOCK);
                return block;
            }
        }
        // `calloc`, which knows when fresh memory is zero already.
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if !(cached(&layout) && push(block)) {
            System.dealloc(block, layout)
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // `malloc`'s own, in place where it can: a kept block is a `malloc`
        // block of BLOCK bytes, so it may be resized like any other, and a
        // block resized to BLOCK bytes may be kept like any other.
        System.realloc(block, layout, new_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> Layout {
        Layout::from_size_align(BLOCK, 1).unwrap()
    }

    // Each test runs on a thread of its own (the test harness's), so each
    // starts with an empty, disabled list.

    #[test]
    fn a_freed_block_is_handed_out_again_on_an_enabled_thread() {
        enable();
        unsafe {
            let a = BlockCache.alloc(block());
            a.write_bytes(7, BLOCK);
            BlockCache.dealloc(a, block());
            assert_eq!(kept(), 1);
            let b = BlockCache.alloc(block());
            assert_eq!(a, b, "the kept block comes back");
            assert_eq!(kept(), 0);
            BlockCache.dealloc(b, block());
        }
        drain();
        assert_eq!(kept(), 0);
    }

    #[test]
    fn a_thread_not_enabled_keeps_nothing() {
        unsafe {
            let a = BlockCache.alloc(block());
            BlockCache.dealloc(a, block());
        }
        assert_eq!(kept(), 0);
    }

    #[test]
    fn other_sizes_and_alignments_pass_through() {
        enable();
        unsafe {
            for layout in [
                Layout::from_size_align(BLOCK - 1, 1).unwrap(),
                Layout::from_size_align(BLOCK + 1, 1).unwrap(),
                Layout::from_size_align(BLOCK, 4096).unwrap(),
            ] {
                let p = BlockCache.alloc(layout);
                assert_eq!(p as usize % layout.align(), 0);
                BlockCache.dealloc(p, layout);
                assert_eq!(kept(), 0, "{layout:?} is not cached");
            }
        }
        drain();
    }

    #[test]
    fn at_most_cap_blocks_are_kept_and_drain_frees_them() {
        enable();
        unsafe {
            let blocks: Vec<_> = (0..CAP + 4).map(|_| BlockCache.alloc(block())).collect();
            for b in blocks {
                BlockCache.dealloc(b, block());
            }
        }
        assert_eq!(kept(), CAP as usize);
        drain();
        assert_eq!(kept(), 0);
        unsafe {
            let a = BlockCache.alloc(block());
            BlockCache.dealloc(a, block());
        }
        assert_eq!(kept(), 0, "drain also stops keeping");
    }

    #[test]
    fn a_kept_block_comes_back_zeroed_when_asked() {
        enable();
        unsafe {
            let a = BlockCache.alloc(block());
            a.write_bytes(0xAB, BLOCK);
            BlockCache.dealloc(a, block());
            let z = BlockCache.alloc_zeroed(block());
            assert_eq!(z, a);
            assert!(std::slice::from_raw_parts(z, BLOCK).iter().all(|&b| b == 0));
            BlockCache.dealloc(z, block());
        }
        drain();
    }

    #[test]
    fn realloc_to_and_from_the_cached_size_keeps_the_bytes() {
        enable();
        unsafe {
            let small = Layout::from_size_align(100, 1).unwrap();
            let p = BlockCache.alloc(small);
            p.write_bytes(5, 100);
            let q = BlockCache.realloc(p, small, BLOCK);
            assert!(std::slice::from_raw_parts(q, 100).iter().all(|&b| b == 5));
            q.add(BLOCK - 1).write(9);
            BlockCache.dealloc(BlockCache.alloc(block()), block());
            assert_eq!(kept(), 1);
            let r = BlockCache.realloc(q, block(), 2 * BLOCK);
            assert!(std::slice::from_raw_parts(r, 100).iter().all(|&b| b == 5));
            assert_eq!(r.add(BLOCK - 1).read(), 9);
            BlockCache.dealloc(r, Layout::from_size_align(2 * BLOCK, 1).unwrap());
        }
        drain();
    }
}
