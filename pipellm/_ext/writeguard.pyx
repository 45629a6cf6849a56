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
        uint64_t state;             /* 2 * generation + protected bit */
        int active;                 /* page protection in use for this entry */
        int pad;
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

    /* Make entry g's pages writable, then start a new generation for every protected
       entry sharing any of those pages (regions carved from one buffer may share a page):
       writable first, bits cleared after. 0 or errno. */
    static int pl_unprotect(pl_guard_t *g) {
        if (mprotect((void *)g->start, g->end - g->start, PROT_READ | PROT_WRITE) != 0) return errno;
        size_t n = __atomic_load_n(&pl_count, __ATOMIC_ACQUIRE);
        for (size_t i = 0; i < n; i++) {
            pl_guard_t *o = &pl_table[i];
            if (__atomic_load_n(&o->active, __ATOMIC_ACQUIRE) && o->start < g->end && g->start < o->end)
                pl_bump(o);
        }
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

    /* a write is coming (or came) that no fault will report: writable, then a new generation */
    static uint64_t pl_mark_written(size_t i, int *err) {
        pl_guard_t *g = &pl_table[i];
        if (g->active) {
            *err = pl_unprotect(g);
            return __atomic_load_n(&g->state, __ATOMIC_ACQUIRE);
        }
        return pl_bump(g);   /* tracked by reports only: no pages to unprotect */
    }

    static uint64_t pl_state(size_t i) { return __atomic_load_n(&pl_table[i].state, __ATOMIC_ACQUIRE); }
    static uint64_t pl_fault_count(void) { return __atomic_load_n(&pl_faults, __ATOMIC_RELAXED); }

    static void pl_set(size_t i, uintptr_t start, uintptr_t end, int active) {
        pl_guard_t *g = &pl_table[i];
        __atomic_store_n(&g->active, 0, __ATOMIC_RELEASE);
        g->start = start;
        g->end = end;
        __atomic_store_n(&g->state, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&g->active, active, __ATOMIC_RELEASE);
        if (i >= pl_count) __atomic_store_n(&pl_count, i + 1, __ATOMIC_RELEASE);
    }

    static int pl_release(size_t i) {
        pl_guard_t *g = &pl_table[i];
        int err = g->active ? pl_unprotect(g) : 0;
        __atomic_store_n(&g->active, 0, __ATOMIC_RELEASE);
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
    void pl_set(size_t i, uintptr_t start, uintptr_t end, int active) nogil
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
        pl_set(index, first, last, 1 if protectable else 0)
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


cdef extern from "<sys/mman.h>" nogil:
    int memfd_create(const char* name, unsigned int flags)
    int madvise(void* addr, size_t length, int advice)
    int MAP_SHARED
    int MFD_CLOEXEC
    int MADV_DONTFORK

cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, long length)
    int close(int fd)


cdef class HostBuffer:
    """Page-aligned host memory the library owns (whole pages, never shared with other
    objects), so its pages can be write-protected. Use :func:`pipellm.empty`.

    The memory is mapped twice (a memfd): the *primary* mapping is what the application
    sees and what write protection applies to; the *alias* is a second, always writable
    mapping of the same pages, through which the library commits device-to-host data
    without unprotecting the primary (so the application's own writes stay caught and
    only the bytes the library wrote need invalidating). The alias is not inherited by
    forked children; the primary is shared with them (a memfd mapping).
    """

    cdef char* _base
    cdef char* _alias
    cdef readonly size_t nbytes
    cdef size_t _mapped

    def __cinit__(self, size_t nbytes):
        self._base = NULL
        self._alias = NULL
        if nbytes == 0:
            raise ValueError("a host buffer needs at least one byte")
        self.nbytes = nbytes
        self._mapped = (nbytes + PAGE - 1) // PAGE * PAGE
        cdef int fd = memfd_create(b"pipellm-host", MFD_CLOEXEC)
        if fd < 0:
            raise MemoryError(f"cannot create host memory: {strerror(errno).decode()}")
        cdef void* p = MAP_FAILED
        cdef void* a = MAP_FAILED
        try:
            if ftruncate(fd, <long>self._mapped) != 0:
                raise MemoryError(f"cannot size {self._mapped} bytes of host memory: {strerror(errno).decode()}")
            p = mmap(NULL, self._mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if p == MAP_FAILED:
                raise MemoryError(f"cannot map {self._mapped} bytes: {strerror(errno).decode()}")
            a = mmap(NULL, self._mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if a == MAP_FAILED:
                munmap(p, self._mapped)
                raise MemoryError(f"cannot map {self._mapped} bytes: {strerror(errno).decode()}")
        finally:
            close(fd)
        madvise(a, self._mapped, MADV_DONTFORK)
        self._base = <char*>p
        self._alias = <char*>a

    def __dealloc__(self):
        if self._base != NULL:
            munmap(self._base, self._mapped)
            self._base = NULL
        if self._alias != NULL:
            munmap(self._alias, self._mapped)
            self._alias = NULL

    @property
    def address(self):
        return <uintptr_t>self._base

    def alias(self):
        """A writable memoryview of the same bytes through the alias mapping."""
        return memoryview(_Alias.wrap(self))

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self._base, <Py_ssize_t>self.nbytes, 0, flags)


cdef class _Alias:
    """Buffer exporter for a HostBuffer's alias mapping (keeps the HostBuffer alive)."""

    cdef HostBuffer owner

    @staticmethod
    cdef _Alias wrap(HostBuffer owner):
        cdef _Alias a = _Alias.__new__(_Alias)
        a.owner = owner
        return a

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self.owner._alias, <Py_ssize_t>self.owner.nbytes, 0, flags)


PAGE_SIZE = PAGE
