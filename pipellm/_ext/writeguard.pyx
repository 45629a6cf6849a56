# cython: language_level=3
"""Write tracking for host regions: page protection plus a SIGSEGV handler.

Each guarded range has a 64-bit *state*: ``2 * generation + protected``. A worker that
is about to encrypt a region calls :func:`protect`, which write-protects the region's
pages (mprotect PROT_READ) and returns the state with the protected bit set: a token.
The first write into a protected page faults; the handler (C, async-signal-safe) makes
the range writable again and moves the state to the next generation with the bit
cleared, then returns so the write proceeds. A token still equal to the current state
therefore proves that nothing was written since the token was taken.

Order rules that keep "state odd => pages write-protected, or a generation bump is on
its way": the protected bit is set only after mprotect(PROT_READ) returned, and pages
are made writable before the bit is cleared.

Limits: a kernel write into a protected page (``os.readv``, ``readinto``) fails with
EFAULT instead of faulting, and DMA does not fault: writers of that kind must call
:func:`mark_written` first (``Region.writing()`` does). Only memory the library owns
(:class:`HostBuffer`, whole pages) is protected; other memory is tracked by explicit
generation bumps only.
"""

from libc.stdint cimport uint64_t, uintptr_t
from libc.errno cimport errno
from libc.string cimport strerror
from cpython.buffer cimport PyBuffer_FillInfo
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap

import threading

from pipellm.errors import ArgumentError

cdef extern from *:
    """
    #include <signal.h>
    #include <stdint.h>
    #include <string.h>
    #include <errno.h>
    #include <sys/mman.h>

    typedef struct {
        uintptr_t start;            /* page-aligned */
        uintptr_t end;              /* page-aligned, exclusive */
        uintptr_t first;            /* the region's own bytes: [first, last) */
        uintptr_t last;
        uint64_t state;             /* 2 * generation + protected bit */
        int active;                 /* page protection in use for this entry */
        int used;                   /* the entry tracks a region (protected or not) */
    } pl_guard_t;

    #define PL_CAPACITY (1u << 20)
    static pl_guard_t *pl_table = NULL;
    static size_t pl_count = 0;      /* entries [0, pl_count) may be active */
    static struct sigaction pl_previous;
    static uint64_t pl_faults = 0;

    static int pl_table_init(void) {
        if (pl_table) return 0;
        void *p = mmap(NULL, PL_CAPACITY * sizeof(pl_guard_t), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return errno;
        pl_table = (pl_guard_t *)p;
        return 0;
    }

    static uint64_t pl_bump(pl_guard_t *g) {
        uint64_t old = __atomic_load_n(&g->state, __ATOMIC_ACQUIRE), next;
        do { next = (old | 1u) + 1u; }
        while (!__atomic_compare_exchange_n(&g->state, &old, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
        return next;
    }

    /* A write may land anywhere in [start, end): a new generation for every entry whose
       bytes overlap it, except entry `skip` (write tracking follows the memory: two
       regions over the same bytes, in one pipeline or two, both learn of a write). */
    static void pl_bump_overlapping(uintptr_t start, uintptr_t end, size_t skip) {
        size_t n = __atomic_load_n(&pl_count, __ATOMIC_ACQUIRE);
        for (size_t i = 0; i < n; i++) {
            pl_guard_t *o = &pl_table[i];
            if (i != skip && __atomic_load_n(&o->used, __ATOMIC_ACQUIRE) && o->first < end && start < o->last)
                pl_bump(o);
        }
    }

    /* Make entry g's pages writable, then start a new generation for every entry sharing
       any of those pages (regions carved from one buffer may share a page; the writes
       that follow no longer fault): writable first, bits cleared after. 0 or errno. */
    static int pl_unprotect(pl_guard_t *g) {
        if (mprotect((void *)g->start, g->end - g->start, PROT_READ | PROT_WRITE) != 0) return errno;
        pl_bump_overlapping(g->start, g->end, (size_t)-1);
        return 0;
    }

    static void pl_handler(int sig, siginfo_t *info, void *context) {
        uintptr_t addr = (uintptr_t)info->si_addr;
        int handled = 0;
        if (info->si_code == SEGV_ACCERR && pl_table) {
            size_t n = __atomic_load_n(&pl_count, __ATOMIC_ACQUIRE);
            for (size_t i = 0; i < n; i++) {
                pl_guard_t *g = &pl_table[i];
                if (__atomic_load_n(&g->active, __ATOMIC_ACQUIRE) && addr >= g->start && addr < g->end
                        && pl_unprotect(g) == 0)
                    handled = 1;
            }
        }
        if (handled) {
            __atomic_add_fetch(&pl_faults, 1, __ATOMIC_RELAXED);
            return;
        }
        /* not ours: hand over to whoever had SIGSEGV before us */
        if (pl_previous.sa_flags & SA_SIGINFO) {
            if (pl_previous.sa_sigaction) { pl_previous.sa_sigaction(sig, info, context); return; }
        } else if (pl_previous.sa_handler != SIG_DFL && pl_previous.sa_handler != SIG_IGN) {
            pl_previous.sa_handler(sig);
            return;
        }
        signal(SIGSEGV, SIG_DFL);   /* the faulting access repeats and ends the process */
    }

    /* install (or re-install, if someone replaced us) the handler; 0 or errno */
    static int pl_install(void) {
        struct sigaction current, ours;
        if (sigaction(SIGSEGV, NULL, &current) != 0) return errno;
        if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == pl_handler) return 0;
        memset(&ours, 0, sizeof ours);
        ours.sa_sigaction = pl_handler;
        ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK | SA_RESTART;
        sigemptyset(&ours.sa_mask);
        if (sigaction(SIGSEGV, &ours, &pl_previous) != 0) return errno;
        return 0;
    }

    static int pl_installed(void) {
        struct sigaction current;
        if (sigaction(SIGSEGV, NULL, &current) != 0) return 0;
        return (current.sa_flags & SA_SIGINFO) && current.sa_sigaction == pl_handler;
    }

    /* write-protect entry i; the token (state with the protected bit) or 0 on error */
    static uint64_t pl_protect(size_t i, int *err) {
        pl_guard_t *g = &pl_table[i];
        for (;;) {
            uint64_t s = __atomic_load_n(&g->state, __ATOMIC_ACQUIRE);
            if (s & 1u) return s;
            if (mprotect((void *)g->start, g->end - g->start, PROT_READ) != 0) { *err = errno; return 0; }
            if (__atomic_compare_exchange_n(&g->state, &s, s | 1u, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                return s | 1u;
        }
    }

    /* a write into [start, end) is coming (or came) that no fault will report: every
       protected region over those bytes made writable, then a new generation for every
       region over them. 0 or errno */
    static int pl_report(uintptr_t start, uintptr_t end) {
        int err = 0;
        size_t n = __atomic_load_n(&pl_count, __ATOMIC_ACQUIRE);
        for (size_t j = 0; j < n; j++) {
            pl_guard_t *o = &pl_table[j];
            if (__atomic_load_n(&o->active, __ATOMIC_ACQUIRE) && o->first < end && start < o->last) {
                int e = pl_unprotect(o);
                if (e) err = e;
            }
        }
        pl_bump_overlapping(start, end, (size_t)-1);
        return err;
    }

    /* a write is coming (or came) that no fault will report: writable, then a new generation */
    static uint64_t pl_mark_written(size_t i, int *err) {
        pl_guard_t *g = &pl_table[i];
        if (g->active) {
            *err = pl_unprotect(g);
            return __atomic_load_n(&g->state, __ATOMIC_ACQUIRE);
        }
        /* tracked by reports only: its own pages are not protected, but another region's
           over the same bytes may be (kernel I/O into them would fail): writable first */
        *err = pl_report(g->first, g->last);
        return __atomic_load_n(&g->state, __ATOMIC_ACQUIRE);
    }

    static uint64_t pl_state(size_t i) { return __atomic_load_n(&pl_table[i].state, __ATOMIC_ACQUIRE); }
    static size_t pl_count_now(void) { return pl_table ? __atomic_load_n(&pl_count, __ATOMIC_ACQUIRE) : 0; }
    static uint64_t pl_fault_count(void) { return __atomic_load_n(&pl_faults, __ATOMIC_RELAXED); }

    static void pl_set(size_t i, uintptr_t first, uintptr_t last, uintptr_t start, uintptr_t end, int active) {
        pl_guard_t *g = &pl_table[i];
        __atomic_store_n(&g->active, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&g->used, 0, __ATOMIC_RELEASE);
        g->start = start;
        g->end = end;
        g->first = first;
        g->last = last;
        __atomic_store_n(&g->state, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&g->active, active, __ATOMIC_RELEASE);
        __atomic_store_n(&g->used, 1, __ATOMIC_RELEASE);
        if (i >= pl_count) __atomic_store_n(&pl_count, i + 1, __ATOMIC_RELEASE);
    }

    static int pl_release(size_t i) {
        pl_guard_t *g = &pl_table[i];
        int err = g->active ? pl_unprotect(g) : 0;
        __atomic_store_n(&g->active, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&g->used, 0, __ATOMIC_RELEASE);
        return err;
    }
    """
    size_t PL_CAPACITY
    int pl_table_init() nogil
    int pl_install() nogil
    int pl_installed() nogil
    uint64_t pl_protect(size_t i, int* err) nogil
    uint64_t pl_mark_written(size_t i, int* err) nogil
    uint64_t pl_state(size_t i) nogil
    uint64_t pl_fault_count() nogil
    size_t pl_count_now() nogil
    void pl_set(size_t i, uintptr_t first, uintptr_t last, uintptr_t start, uintptr_t end, int active) nogil
    void pl_bump_overlapping(uintptr_t start, uintptr_t end, size_t skip) nogil
    int pl_report(uintptr_t start, uintptr_t end) nogil
    int pl_release(size_t i) nogil

cdef extern from "<unistd.h>" nogil:
    long sysconf(int name)
    int _SC_PAGESIZE

cdef size_t PAGE = <size_t>sysconf(_SC_PAGESIZE)

_lock = threading.Lock()
_free = []           # released entry indices
_next = 0            # next never-used index


def _os_error(int err, what):
    return OSError(err, f"{what}: {strerror(err).decode()}")


def acquire_entry(uintptr_t start, size_t nbytes, bint protectable) -> int:
    """A guard entry for [start, start+nbytes). Protectable entries cover the whole pages
    of the range and install the fault handler."""
    global _next
    cdef int err
    cdef size_t index
    cdef uintptr_t first = start - start % PAGE
    cdef uintptr_t last = start + nbytes
    last = (last + PAGE - 1) // PAGE * PAGE
    with _lock:
        err = pl_table_init()
        if err:
            raise _os_error(err, "cannot map the write-guard table")
        if protectable:
            err = pl_install()
            if err:
                raise _os_error(err, "cannot install the SIGSEGV handler")
        if _free:
            index = _free.pop()
        elif _next < PL_CAPACITY:
            index = _next
            _next += 1
        else:
            raise MemoryError(f"more than {PL_CAPACITY} regions are guarded at once")
        pl_set(index, start, start + nbytes, first, last, 1 if protectable else 0)
    return index


def release_entry(size_t index) -> None:
    """Make the entry's pages writable again and give the entry back."""
    cdef int err = pl_release(index)
    with _lock:
        _free.append(index)
    if err:
        raise _os_error(err, "mprotect failed while releasing a guarded region")


def protect(size_t index) -> int:
    """Write-protect the entry's pages; returns the token (state with protected bit)."""
    cdef int err = 0
    cdef uint64_t token
    token = pl_state(index)
    if token & 1:  # already protected: the common case, no system call
        return token
    if not pl_installed():  # someone (faulthandler.enable, a debugger) replaced our handler
        with _lock:
            pl_install()
    # the GIL stays held: a short system call, and handing the GIL to another thread
    # here would cost the caller far more than the call itself
    token = pl_protect(index, &err)
    if err:
        raise _os_error(err, "mprotect failed")
    return token


def mark_written(size_t index) -> int:
    """A write the fault handler will not see (kernel I/O, DMA, library commits, explicit
    regions): make the pages writable and start a new generation. Returns the state."""
    cdef int err = 0
    cdef uint64_t state = pl_mark_written(index, &err)
    if err:
        raise _os_error(err, "mprotect failed")
    return state


def written(uintptr_t start, size_t nbytes, skip=None) -> None:
    """The library writes (or wrote) ``[start, start + nbytes)`` without a fault to say so
    (a device-to-host commit through the alias mapping, a copy from the device thread):
    every entry over any of those bytes but ``skip`` (the region written, which keeps its
    own span log) starts a new generation, so no prepared ciphertext of them is sent."""
    if nbytes and pl_count_now():
        pl_bump_overlapping(start, start + nbytes, <size_t>-1 if skip is None else <size_t>skip)


def report(uintptr_t start, size_t nbytes) -> None:
    """A write into ``[start, start + nbytes)`` that no fault reports (an untracked
    region's ``writing()``): every registration's protection over those bytes is lifted
    (kernel I/O may write them) and every registration over them starts a new generation."""
    cdef int err = 0
    if nbytes and pl_count_now():
        err = pl_report(start, start + nbytes)
    if err:
        raise _os_error(err, "mprotect failed")


def state(size_t index) -> int:
    """The entry's current state (compare with a token)."""
    return pl_state(index)


cpdef token(guard, tracking):
    """A region's validation token: None where it is not tracked (``guard`` None), for
    ``tracking == "protect"`` its pages write-protected first (:func:`protect`), else
    its state. (``Region.token``; speculation calls it in C for every item it plans.)"""
    if guard is None:
        return None
    if tracking == "protect":
        return protect(guard)
    return pl_state(<size_t>guard)


cpdef bint unchanged(guard, token) except -1:
    """Nothing was written to a region since ``token`` was taken (``Region.unchanged_since``;
    in C on every speculative hit)."""
    return token is not None and guard is not None and pl_state(<size_t>guard) == <uint64_t>token


def fault_count() -> int:
    """Write faults handled since the process started."""
    return pl_fault_count()


cdef extern from *:
    """
    #include <fcntl.h>
    #include <pthread.h>
    #include <stdlib.h>
    #include <unistd.h>
    #include <sys/mman.h>

    /* Library-owned host memory, from memfd arenas. Each buffer is a range of an arena
       file mapped twice: the primary (what the application sees, write-protected while
       speculated on) and the alias (always writable, for the library's commits). One
       fd per arena, not per buffer (an LLM has thousands of tensors); freed ranges are
       punched out of the file, offsets are never reused.

       fork(): a child would share the primary mapping (MAP_SHARED) and so could change
       the parent's bytes behind its write guard. The child handler below remaps every
       buffer MAP_PRIVATE at the same address: the child reads the same bytes and its
       writes copy pages for itself (the kernel's copy-on-write, one mmap per buffer at
       fork, no copy). The alias is not inherited (MADV_DONTFORK). */
    #define PL_ARENA_LIMIT ((off_t)1 << 40)   /* a new arena file past this size */

    typedef struct pl_arena { int fd; off_t end; size_t live; int forked; } pl_arena_t;
    typedef struct pl_buf {
        char *base, *alias;
        size_t mapped;
        off_t offset;
        pl_arena_t *arena;           /* NULL in a forked child: its pages are private */
        struct pl_buf *prev, *next;
    } pl_buf_t;

    static pl_buf_t pl_bufs = {NULL, NULL, 0, 0, NULL, &pl_bufs, &pl_bufs};
    static pl_arena_t *pl_arena = NULL;
    static pthread_mutex_t pl_buf_lock = PTHREAD_MUTEX_INITIALIZER;
    static int pl_atfork_set = 0;

    static void pl_arena_drop(pl_arena_t *a) {
        if (a && a->live == 0 && a != pl_arena) { close(a->fd); free(a); }
    }

    static void pl_fork_prepare(void) { pthread_mutex_lock(&pl_buf_lock); }
    /* A child now maps every live buffer's range privately: a page it has not written is
       still read from the file, so the parent must not punch those ranges out when it
       frees them (the child's arrays would read zeros). Their arenas keep their pages
       until the arena is dropped; new buffers come from a new arena. */
    static void pl_fork_parent(void) {
        for (pl_buf_t *b = pl_bufs.next; b != &pl_bufs; b = b->next)
            if (b->arena) b->arena->forked = 1;
        if (pl_arena && pl_arena->forked) {
            pl_arena_t *old = pl_arena;
            pl_arena = NULL;
            pl_arena_drop(old);
        }
        pthread_mutex_unlock(&pl_buf_lock);
    }
    static void pl_fork_child(void) {
        for (pl_buf_t *b = pl_bufs.next; b != &pl_bufs; b = b->next) {
            if (b->arena == NULL) continue;  /* private already (a fork of a fork) */
            if (mmap(b->base, b->mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED,
                     b->arena->fd, b->offset) == MAP_FAILED)
                /* never leave the parent's pages writable here: no access at all instead */
                mmap(b->base, b->mapped, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            b->alias = NULL;      /* not inherited */
        }
        /* the parent's arena files are not the child's: forget them (the child's
           buffers are private now), allocate from a new one */
        for (pl_buf_t *b = pl_bufs.next; b != &pl_bufs; b = b->next) {
            pl_arena_t *a = b->arena;
            if (a == NULL) continue;
            b->arena = NULL;
            if (a->fd >= 0) { close(a->fd); a->fd = -1; }
        }
        pl_arena = NULL;          /* (the arena structs are leaked in the child: a few bytes) */
        /* the remapped pages are writable: no write-protection token survives the fork */
        size_t n = pl_table ? pl_count : 0;
        for (size_t i = 0; i < n; i++)
            if (pl_table[i].used) pl_bump(&pl_table[i]);
        pthread_mutex_unlock(&pl_buf_lock);
    }

    /* a buffer of `mapped` bytes (whole pages); 0 or errno */
    static int pl_buf_alloc(pl_buf_t *b, size_t mapped) {
        int err = 0;
        pthread_mutex_lock(&pl_buf_lock);
        if (!pl_atfork_set) {
            if ((err = pthread_atfork(pl_fork_prepare, pl_fork_parent, pl_fork_child)) != 0) goto out;
            pl_atfork_set = 1;
        }
        if (pl_arena == NULL || pl_arena->end + (off_t)mapped > PL_ARENA_LIMIT) {
            pl_arena_t *old = pl_arena, *a = calloc(1, sizeof *a);
            if (a == NULL) { err = ENOMEM; goto out; }
            a->fd = memfd_create("pipellm-host", MFD_CLOEXEC);
            if (a->fd < 0) { err = errno; free(a); goto out; }
            pl_arena = a;
            pl_arena_drop(old);
        }
        b->arena = pl_arena;
        b->offset = pl_arena->end;
        b->mapped = mapped;
        if (ftruncate(pl_arena->fd, b->offset + (off_t)mapped) != 0) { err = errno; goto out; }
        b->base = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, pl_arena->fd, b->offset);
        if (b->base == MAP_FAILED) { err = errno; b->base = NULL; goto out; }
        b->alias = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, pl_arena->fd, b->offset);
        if (b->alias == MAP_FAILED) { err = errno; b->alias = NULL; munmap(b->base, mapped); b->base = NULL; goto out; }
        madvise(b->alias, mapped, MADV_DONTFORK);
        pl_arena->end += (off_t)mapped;
        pl_arena->live++;
        b->next = pl_bufs.next; b->prev = &pl_bufs;
        pl_bufs.next->prev = b; pl_bufs.next = b;
    out:
        pthread_mutex_unlock(&pl_buf_lock);
        return err;
    }

    static void pl_buf_free(pl_buf_t *b) {
        pthread_mutex_lock(&pl_buf_lock);
        b->prev->next = b->next; b->next->prev = b->prev;
        munmap(b->base, b->mapped);
        if (b->alias) munmap(b->alias, b->mapped);
        pl_arena_t *a = b->arena;
        if (a != NULL) {  /* give the pages back: nothing maps this range any more (unless a child does) */
            if (!a->forked)
                fallocate(a->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, b->offset, (off_t)b->mapped);
            a->live--;
            pl_arena_drop(a);
        }
        pthread_mutex_unlock(&pl_buf_lock);
    }
    """
    ctypedef struct pl_buf_t:
        char* base
        char* alias
    int pl_buf_alloc(pl_buf_t* b, size_t mapped) nogil
    void pl_buf_free(pl_buf_t* b) nogil


cdef class HostBuffer:
    """Page-aligned host memory the library owns (whole pages, never shared with other
    objects), so its pages can be write-protected. Use :func:`pipellm.empty`.

    The memory is mapped twice (a range of a memfd arena): the *primary* mapping is what
    the application sees and what write protection applies to; the *alias* is a second,
    always writable mapping of the same pages, through which the library commits
    device-to-host data without unprotecting the primary (so the application's own
    writes stay caught and only the bytes the library wrote need invalidating). A forked
    child gets a private copy-on-write mapping instead of the primary (it can never
    change the parent's bytes) and no alias. (A page the child has not written reads
    the file: the parent's later writes to it show in the child, as with any private
    mapping of a shared file; the parent never punches out a range a child maps.)
    """

    cdef pl_buf_t _buf
    cdef readonly size_t nbytes
    cdef bint _live

    def __cinit__(self, size_t nbytes):
        self._live = False
        if nbytes == 0:
            raise ArgumentError("a host buffer needs at least one byte")
        self.nbytes = nbytes
        cdef size_t mapped = (nbytes + PAGE - 1) // PAGE * PAGE
        cdef int err = pl_buf_alloc(&self._buf, mapped)
        if err:
            raise MemoryError(f"cannot map {mapped} bytes of host memory: {strerror(err).decode()}")
        self._live = True

    def __dealloc__(self):
        if self._live:
            self._live = False
            pl_buf_free(&self._buf)

    @property
    def address(self):
        return <uintptr_t>self._buf.base

    def alias(self):
        """A writable memoryview of the same bytes through the alias mapping, or None in
        a forked child, which has none (its library writes go through the primary
        mapping, whose protection faults are handled like the application's)."""
        if self._buf.alias == NULL:
            return None
        return memoryview(_Alias.wrap(self))

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self._buf.base, <Py_ssize_t>self.nbytes, 0, flags)


cdef class _Alias:
    """Buffer exporter for a HostBuffer's alias mapping (keeps the HostBuffer alive)."""

    cdef HostBuffer owner

    @staticmethod
    cdef _Alias wrap(HostBuffer owner):
        cdef _Alias a = _Alias.__new__(_Alias)
        a.owner = owner
        return a

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self.owner._buf.alias, <Py_ssize_t>self.owner.nbytes, 0, flags)


PAGE_SIZE = PAGE
