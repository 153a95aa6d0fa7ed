//! A per-thread cache of 8 KiB blocks in front of the system allocator: the
//! blocks hyper's read buffers are made of, allocated and freed twice per
//! request on each hop.
//!
//! Why they come and go: hyper splits a message's head off its connection's
//! read buffer and keeps the header values pointing into it. Its next read
//! (to notice a client closing while its request is in flight, or an upstream
//! closing once its answer is in) then finds the buffer shared and allocates
//! a fresh one (`BytesMut::reserve`, 8 KiB while its reads stay small); the
//! old one is freed when the message is dropped. glibc serves 8 KiB from its
//! bins, not from its per-thread cache (which stops at about 1 KiB), after
//! merging its fast bins, and with a filter's many locks streaming through
//! the CPU's cache those bins miss it (`bench/README.md` has the counts).
//! nginx keeps its buffers in pools; mimalloc, which also recycles such blocks
//! per thread, cost 62% more memory per lock and was dropped. This keeps only
//! that one size.
//!
//! Only threads that run an event loop keep blocks ([`enable`]), at most
//! [`CAP`] each: 128 KiB a thread, so a filter with a loop per CPU may keep
//! that times its CPUs. They give them back when the loop ends, unwinding
//! included (the guard's drop); any other thread (tokio's blocking pool comes
//! and goes) passes straight through, so no thread ends holding blocks nobody
//! can free. A block freed on another loop's thread joins that thread's list:
//! every block is a `malloc` block, which any thread may hand out or free.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;

/// The size kept: hyper's first read buffer (`INIT_BUFFER_SIZE`), the size
/// it asks for again each time the old one is shared.
pub const BLOCK: usize = 8192;

/// At most this many blocks kept per thread: a loop needs about two per
/// connection with a request in flight; what is over goes back to `malloc`.
pub const CAP: u32 = 16;

/// The most alignment a kept block may be asked for: `malloc` gives every
/// block at least a pointer's alignment on every platform.
const ALIGN: usize = std::mem::align_of::<usize>();

/// The one layout `System` sees for a block of the kept size, whatever
/// alignment (up to [`ALIGN`]) the caller asked for: each block is then
/// allocated and freed with the same layout, as `GlobalAlloc` requires, from
/// whichever caller it passes through.
const BLOCK_LAYOUT: Layout = match Layout::from_size_align(BLOCK, ALIGN) {
    Ok(l) => l,
    Err(_) => panic!("a valid layout"),
};

/// A thread's list: free blocks chained through their first word.
#[derive(Clone, Copy)]
struct List {
    head: *mut u8,
    len: u32,
    on: bool,
}

thread_local! {
    // `const` and a `Copy` type without `Drop`: where Rust has native
    // thread-locals (Linux, which fencegate is built for, among them),
    // reading it never allocates, never registers a destructor and never
    // fails, which an allocator needs.
    static LIST: Cell<List> = const { Cell::new(List { head: ptr::null_mut(), len: 0, on: false }) };
}

/// The global allocator of the `fencegate` binary: [`System`], with 8 KiB
/// blocks kept per event-loop thread.
pub struct BlockCache;

/// Keeping blocks on one thread, from [`enable`] until this is dropped. Not
/// `Send`: dropped on another thread, it would empty that thread's list.
#[must_use = "the thread keeps blocks only while this lives"]
pub struct Enabled(std::marker::PhantomData<*const ()>);

impl Drop for Enabled {
    fn drop(&mut self) {
        drain();
    }
}

fn kept_size(layout: &Layout) -> bool {
    layout.size() == BLOCK && layout.align() <= ALIGN
}

/// Starts keeping blocks on this thread, until the guard is dropped. Hold it
/// for as long as the thread runs its event loop, and take it before the
/// loop's runtime, so that the runtime (and what it frees) goes first.
pub fn enable() -> Enabled {
    LIST.with(|l| l.set(List { on: true, ..l.get() }));
    Enabled(std::marker::PhantomData)
}

/// Stops keeping blocks on this thread and frees those it kept.
fn drain() {
    let mut list = LIST.with(|l| l.replace(List { head: ptr::null_mut(), len: 0, on: false }));
    while !list.head.is_null() {
        let block = list.head;
        // SAFETY: every block on the list is a live block that `System` gave
        // for BLOCK_LAYOUT, its first word the next one (`push`).
        unsafe {
            list.head = block.cast::<*mut u8>().read();
            System.dealloc(block, BLOCK_LAYOUT);
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
        // SAFETY: `block` is a freed BLOCK-byte block, aligned for a pointer;
        // its first word is ours until it is handed out again.
        unsafe { block.cast::<*mut u8>().write(list.head) };
        list.head = block;
        list.len += 1;
        l.set(list);
        true
    })
}

// SAFETY: `System` sees every block of the kept size with one layout,
// BLOCK_LAYOUT, from its allocation to its free (`alloc`, `alloc_zeroed`,
// `dealloc` and `drain` map to it; `realloc` moves such blocks through them);
// a block handed out from a list is one of those, freed since, and BLOCK_LAYOUT
// satisfies any layout of that size with an alignment up to ALIGN. A block is
// on at most one list: pushed once per free, popped once per allocation.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !kept_size(&layout) {
            return System.alloc(layout);
        }
        match pop() {
            block if block.is_null() => System.alloc(BLOCK_LAYOUT),
            block => block,
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !kept_size(&layout) {
            // `calloc`, which knows when fresh memory is zero already.
            return System.alloc_zeroed(layout);
        }
        match pop() {
            block if block.is_null() => System.alloc_zeroed(BLOCK_LAYOUT),
            block => {
                block.write_bytes(0, BLOCK);
                block
            }
        }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if !kept_size(&layout) {
            System.dealloc(block, layout)
        } else if !push(block) {
            System.dealloc(block, BLOCK_LAYOUT)
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align_unchecked(new_size, layout.align());
        if !kept_size(&layout) && !kept_size(&new) {
            // `malloc`'s own, in place where it can.
            return System.realloc(block, layout, new_size);
        }
        // The kept size on either side: moved through `alloc` and `dealloc`,
        // so that `System` sees such a block with BLOCK_LAYOUT only (rare: a
        // read buffer growing for a large body, an 8 KiB copy at most).
        let moved = self.alloc(new);
        if !moved.is_null() {
            ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
            self.dealloc(block, layout);
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> Layout {
        Layout::from_size_align(BLOCK, 1).unwrap()
    }

    // Each test runs on a thread of its own (libtest's), and each guard
    // drains its thread's list when the test ends.

    #[test]
    fn a_freed_block_is_handed_out_again_on_an_enabled_thread() {
        let on = enable();
        unsafe {
            let a = BlockCache.alloc(block());
            a.write_bytes(7, BLOCK);
            BlockCache.dealloc(a, block());
            assert_eq!(kept(), 1);
            let b = BlockCache.alloc(Layout::from_size_align(BLOCK, ALIGN).unwrap());
            assert_eq!(a, b, "the kept block comes back, for any alignment up to a pointer's");
            assert_eq!(kept(), 0);
            BlockCache.dealloc(b, block());
        }
        drop(on);
        assert_eq!(kept(), 0, "the guard's drop frees what is kept");
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
        let _on = enable();
        unsafe {
            for layout in [
                Layout::from_size_align(BLOCK - 1, 1).unwrap(),
                Layout::from_size_align(BLOCK + 1, 1).unwrap(),
                Layout::from_size_align(BLOCK, 4096).unwrap(),
            ] {
                let p = BlockCache.alloc(layout);
                assert_eq!(p as usize % layout.align(), 0);
                BlockCache.dealloc(p, layout);
                assert_eq!(kept(), 0, "{layout:?} is not kept");
            }
        }
    }

    #[test]
    fn at_most_cap_blocks_are_kept_and_the_guard_frees_them() {
        let on = enable();
        unsafe {
            let blocks: Vec<_> = (0..CAP + 4).map(|_| BlockCache.alloc(block())).collect();
            for b in blocks {
                BlockCache.dealloc(b, block());
            }
        }
        assert_eq!(kept(), CAP as usize);
        drop(on);
        assert_eq!(kept(), 0);
        unsafe {
            let a = BlockCache.alloc(block());
            BlockCache.dealloc(a, block());
        }
        assert_eq!(kept(), 0, "and the thread stops keeping");
    }

    #[test]
    fn the_guard_frees_the_blocks_when_the_thread_unwinds() {
        let kept_after = std::thread::spawn(|| {
            let caught = std::panic::catch_unwind(|| {
                let _on = enable();
                unsafe { BlockCache.dealloc(BlockCache.alloc(block()), block()) };
                assert_eq!(kept(), 1);
                panic!("a loop that panics");
            });
            assert!(caught.is_err());
            kept()
        })
        .join()
        .unwrap();
        assert_eq!(kept_after, 0);
    }

    #[test]
    fn a_kept_block_comes_back_zeroed_when_asked() {
        let _on = enable();
        unsafe {
            let a = BlockCache.alloc(block());
            a.write_bytes(0xAB, BLOCK);
            BlockCache.dealloc(a, block());
            let z = BlockCache.alloc_zeroed(block());
            assert_eq!(z, a);
            assert!(std::slice::from_raw_parts(z, BLOCK).iter().all(|&b| b == 0));
            BlockCache.dealloc(z, block());
        }
    }

    #[test]
    fn realloc_moves_blocks_of_the_kept_size_through_the_list() {
        let _on = enable();
        unsafe {
            // To the kept size: a block from the list, the bytes moved.
            let kept_block = BlockCache.alloc(block());
            BlockCache.dealloc(kept_block, block());
            let small = Layout::from_size_align(100, 1).unwrap();
            let p = BlockCache.alloc(small);
            p.write_bytes(5, 100);
            let q = BlockCache.realloc(p, small, BLOCK);
            assert_eq!(q, kept_block);
            assert_eq!(kept(), 0);
            assert!(std::slice::from_raw_parts(q, 100).iter().all(|&b| b == 5));
            // From it: the bytes moved, and the block kept.
            q.add(BLOCK - 1).write(9);
            let r = BlockCache.realloc(q, block(), 2 * BLOCK);
            assert_eq!(kept(), 1, "the block it left is kept");
            assert!(std::slice::from_raw_parts(r, 100).iter().all(|&b| b == 5));
            assert_eq!(r.add(BLOCK - 1).read(), 9);
            BlockCache.dealloc(r, Layout::from_size_align(2 * BLOCK, 1).unwrap());
        }
    }
}
