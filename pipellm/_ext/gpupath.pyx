# cython: language_level=3, boundscheck=False, wraparound=False
"""The cuda device's host-to-device hot path in C, over a table of driver calls
(``drivertable.pxd``): the real driver where ``cudadriver`` is built, or a Python fake
(``pipellm.devices.fakedriver``) anywhere.

A *group* is the unit of verification: its messages' ciphertexts are copied into a
staging ring, one driver call per message; their rows (IV, header, tag, offset, length,
destination) are written into page-locked host memory in C. Launching a group costs a
fixed number of calls: an event behind its copies that the kernel stream waits for, one
copy of its rows, three AES-GCM launches per key (GHASH, tag check, CTR), a commit
launch that copies to each destination only the plaintext of messages whose transfer,
and every message before it in the group, verified and only while the session's
refusal flag on the GPU is clear (so groups queued behind a refused one commit
nothing, with no host round trip), a status launch that finds the first refused message
and raises the flag, the status copied back, and an event. The host learns a group's
outcome by querying that event (``result``); it waits (the GIL released) only when
asked to or when the staging ring is full.

The kernels are numba-cuda's, loaded as PTX; their parameters are packed here in numba's
array ABI (per array: meminfo, parent, nitems, itemsize, data, shape..., strides...).
"""

from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char* text, size_t most)
from posix.time cimport CLOCK_THREAD_CPUTIME_ID, clock_gettime, timespec
from threading import get_ident

from pipellm._ext.drivertable cimport DriverTable, FAKE_RAISED, NOT_READY, SUCCESS

from pipellm.errors import ArgumentError, DeviceError, DeviceUnavailableError

# -- rows: one per staged message, 144 bytes, read in place by the kernels -----------------
DEF ROW_BYTES = 144
DEF ROW_IV = 0          # 3 big-endian words
DEF ROW_AAD = 16        # 16 words: the header, zero-padded
DEF ROW_TAG = 80        # 4 words
DEF ROW_OFF = 96        # int64: staging offset
DEF ROW_LEN = 104       # int64: ciphertext bytes
DEF ROW_DST = 112       # int64: destination address, 0 for none (yet)
DEF ROW_UPTO = 120      # int64: committed if messages 0..upto of the group verified
AAD_BYTES = 64
ROW = ROW_BYTES

DEF MAX_GROUPS = 8      # groups in flight
DEF MAX_RUNS = 32       # runs of messages under one key in a group (3 launches each)
DEF MAX_PARAMS = 96     # the largest block (ctr_kernel) is 72 words
DEF THREADS = 128
DEF CHUNK_BLOCKS = 64
DEF COMMIT_BLOCKS = 256

def installed_fake():
    """The fake driver the table calls now (None before the first ``Driver.fake``)."""
    return _fake


MAX_IN_FLIGHT = MAX_GROUPS  # groups launched whose outcome is not yet read, at most

KERNELS = ("ghash_kernel", "tag_kernel", "ctr_kernel", "commit_kernel", "status_kernel")

# -- driver results as exceptions, in one place ---------------------------------------------
cdef object _raised = None  # what a fake's callback raised (see FAKE_RAISED)
cdef object _fake = None    # the fake the trampolines call


cdef int _check(DriverTable* t, int result, str what) except -1:
    global _raised
    cdef const char* text = NULL
    if result == SUCCESS:
        return 0
    if result == FAKE_RAISED and _raised is not None:
        exc, _raised = _raised, None
        raise exc
    name = f"CUresult {result}"
    if t.error_name(result, &text) == SUCCESS and text != NULL:
        name = text.decode()
    if result in (100, 34, 46, 3):  # no device, stub library, device unavailable, not initialised
        raise DeviceUnavailableError(f"{what} failed: {name}")
    raise DeviceError(f"{what} failed: {name}")


cdef class Driver:
    """A table of driver calls and what keeps it valid. Made by :meth:`real` or
    :meth:`fake`; the constructor is refused."""

    cdef DriverTable* t
    cdef object _owner
    cdef readonly str kind
    cdef readonly int device

    def __init__(self, *args, **kw):
        raise TypeError("Driver is made by Driver.real(device_id) or Driver.fake(fake)")

    @staticmethod
    def real(int device_id=0):
        """The CUDA driver (needs pipellm._ext.cudadriver, built where the CUDA headers were)."""
        from pipellm._ext import cudadriver
        capsule = cudadriver.table()
        cdef Driver d = Driver.__new__(Driver)
        d.t = <DriverTable*>PyCapsule_GetPointer(capsule, b"pipellm.DriverTable")
        d._owner, d.kind, d.device = capsule, "cuda", device_id
        return d

    @staticmethod
    def fake(fake):
        """A Python fake (see ``pipellm.devices.fakedriver.FakeDriver``) behind the table:
        one per process at a time, as the real driver is (another one is refused while
        it still holds memory or streams)."""
        global _fake
        if _fake is not None and _fake is not fake and _fake.in_use():
            raise DeviceError("another fake driver is in use in this process (one driver per process, "
                              "as CUDA's): share it (pipellm.devices.fakedriver.installed()) or close its users")
        _fake = fake
        cdef Driver d = Driver.__new__(Driver)
        d.t = &_fake_table
        d._owner, d.kind, d.device = fake, "fake", 0
        return d

    cdef int current(self) except -1:
        return _check(self.t, self.t.context_current(self.device), "cuCtxSetCurrent")

    # set-up calls (not on the per-message path)
    def use_context(self) -> None:
        """Make the device's primary context current on the calling thread."""
        self.current()

    def alloc(self, size_t nbytes) -> int:
        cdef uint64_t address = 0
        _check(self.t, self.t.mem_alloc(&address, max(nbytes, 16)), f"cuMemAlloc({nbytes})")
        return address

    def free(self, uint64_t address) -> None:
        _check(self.t, self.t.mem_free(address), "cuMemFree")

    def host_alloc(self, size_t nbytes) -> int:
        cdef void* pointer = NULL
        _check(self.t, self.t.host_alloc(&pointer, max(nbytes, 16)), f"cuMemHostAlloc({nbytes})")
        memset(pointer, 0, max(nbytes, 16))
        return <uintptr_t>pointer

    def host_free(self, uintptr_t pointer) -> None:
        _check(self.t, self.t.host_free(<void*>pointer), "cuMemFreeHost")

    def stream(self) -> int:
        cdef void* handle = NULL
        _check(self.t, self.t.stream_create(&handle), "cuStreamCreate")
        return <uintptr_t>handle

    def stream_destroy(self, uintptr_t stream) -> None:
        _check(self.t, self.t.stream_destroy(<void*>stream), "cuStreamDestroy")

    def event(self) -> int:
        cdef void* handle = NULL
        _check(self.t, self.t.event_create(&handle), "cuEventCreate")
        return <uintptr_t>handle

    def event_destroy(self, uintptr_t event) -> None:
        _check(self.t, self.t.event_destroy(<void*>event), "cuEventDestroy")

    def synchronize(self, uintptr_t stream) -> None:
        cdef int result
        with nogil:
            result = self.t.stream_synchronize(<void*>stream)
        _check(self.t, result, "cuStreamSynchronize")

    def copy_htod(self, uint64_t dst, const unsigned char[::1] src not None, uintptr_t stream) -> None:
        """Queue a copy of host bytes (keep them alive and unchanged until the stream passed it)."""
        if src.shape[0]:
            _check(self.t, self.t.copy_htod(dst, &src[0], src.shape[0], <void*>stream), "cuMemcpyHtoDAsync")

    def copy_dtoh(self, unsigned char[::1] dst not None, uint64_t src, uintptr_t stream) -> None:
        if dst.shape[0]:
            _check(self.t, self.t.copy_dtoh(&dst[0], src, dst.shape[0], <void*>stream), "cuMemcpyDtoHAsync")

    def copy_dtod(self, uint64_t dst, uint64_t src, size_t nbytes, uintptr_t stream) -> None:
        if nbytes:
            _check(self.t, self.t.copy_dtod(dst, src, nbytes, <void*>stream), "cuMemcpyDtoDAsync")

    def load(self, bytes image not None, names) -> tuple:
        """Load a module image (PTX, NUL-terminated here) and return its functions' handles."""
        cdef void* module = NULL
        cdef void* function = NULL
        image = image + b"\0"
        _check(self.t, self.t.module_load(&module, <const char*>image), "cuModuleLoadData")
        handles = []
        for name in names:
            encoded = name.encode()
            _check(self.t, self.t.module_function(&function, module, encoded), f"cuModuleGetFunction({name})")
            handles.append(<uintptr_t>function)
        return tuple(handles)


# -- the fake's trampolines: C calls into the Python fake ---------------------------------------
cdef int _fail(BaseException exc) noexcept:
    global _raised
    _raised = exc
    return FAKE_RAISED


cdef inline double _cpu() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


cdef void _account(double start) noexcept:
    # the calling thread's CPU inside the fake, trampoline included: what a benchmark of
    # the host takes out (a real driver call costs microseconds of C instead)
    try:
        _fake.call_cpu_s[get_ident()] += _cpu() - start
    except BaseException:
        pass


cdef int _call(str name, tuple args, double start, uint64_t* out) noexcept:
    """Call the fake's method ``name``; its result into ``out`` where one is wanted. An
    exception is kept for ``_check`` to raise (C callers see FAKE_RAISED)."""
    try:
        result = getattr(_fake, name)(*args)
        if out != NULL:
            out[0] = <uint64_t>result
        return SUCCESS
    except BaseException as exc:
        return _fail(exc)
    finally:
        _account(start)


cdef int _f_error_name(int result, const char** text) noexcept nogil:
    return 1


cdef int _f_context_current(int device) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("context_current", (device,), start, NULL)


cdef int _f_mem_alloc(uint64_t* address, size_t nbytes) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("mem_alloc", (nbytes,), start, address)


cdef int _f_mem_free(uint64_t address) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("mem_free", (address,), start, NULL)


cdef int _f_host_alloc(void** pointer, size_t nbytes) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("host_alloc", (nbytes,), start, <uint64_t*>pointer)


cdef int _f_host_free(void* pointer) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("host_free", (<uintptr_t>pointer,), start, NULL)


cdef int _f_stream_create(void** stream) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("stream_create", (), start, <uint64_t*>stream)


cdef int _f_stream_destroy(void* stream) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("stream_destroy", (<uintptr_t>stream,), start, NULL)


cdef int _f_stream_wait_event(void* stream, void* event) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("stream_wait_event", (<uintptr_t>stream, <uintptr_t>event), start, NULL)


cdef int _f_stream_synchronize(void* stream) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("stream_synchronize", (<uintptr_t>stream,), start, NULL)


cdef int _f_event_create(void** event) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("event_create", (), start, <uint64_t*>event)


cdef int _f_event_destroy(void* event) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("event_destroy", (<uintptr_t>event,), start, NULL)


cdef int _f_event_record(void* event, void* stream) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("event_record", (<uintptr_t>event, <uintptr_t>stream), start, NULL)


cdef int _f_event_query(void* event) noexcept nogil:
    cdef double start = _cpu()
    cdef uint64_t done = 0
    cdef int result
    with gil:
        result = _call("event_query", (<uintptr_t>event,), start, &done)
    return result if result != SUCCESS else (SUCCESS if done else NOT_READY)


cdef int _f_event_synchronize(void* event) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("event_synchronize", (<uintptr_t>event,), start, NULL)


cdef int _f_copy_htod(uint64_t dst, const void* src, size_t nbytes, void* stream) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("copy_htod", (dst, <uintptr_t>src, nbytes, <uintptr_t>stream), start, NULL)


cdef int _f_copy_dtoh(void* dst, uint64_t src, size_t nbytes, void* stream) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("copy_dtoh", (<uintptr_t>dst, src, nbytes, <uintptr_t>stream), start, NULL)


cdef int _f_copy_dtod(uint64_t dst, uint64_t src, size_t nbytes, void* stream) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("copy_dtod", (dst, src, nbytes, <uintptr_t>stream), start, NULL)


cdef int _f_module_load(void** module, const void* image) noexcept nogil:
    cdef double start = _cpu()
    cdef size_t n = strnlen(<const char*>image, 64)  # the image's start, no further than its end
    with gil:
        return _call("module_load", ((<const char*>image)[:n],), start, <uint64_t*>module)


cdef int _f_module_function(void** function, void* module, const char* name) noexcept nogil:
    cdef double start = _cpu()
    with gil:
        return _call("module_function", (<uintptr_t>module, name.decode()), start, <uint64_t*>function)


cdef int _launch_gil(void* function, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                     unsigned int by, unsigned int bz, unsigned int shared, void* stream,
                     void** params) noexcept:
    cdef int i
    try:
        # the parameter block is read now, as the driver does: it may be reused on return
        count = _fake.param_count(<uintptr_t>function)
        values = [(<int64_t*>params[i])[0] for i in range(count)]
        _fake.launch(<uintptr_t>function, (gx, gy, gz), (bx, by, bz), shared, <uintptr_t>stream, values)
        return SUCCESS
    except BaseException as exc:
        return _fail(exc)


cdef int _f_launch(void* function, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                   unsigned int by, unsigned int bz, unsigned int shared, void* stream,
                   void** params) noexcept nogil:
    cdef double start = _cpu()
    cdef int result
    with gil:
        result = _launch_gil(function, gx, gy, gz, bx, by, bz, shared, stream, params)
        _account(start)
        return result


cdef DriverTable _fake_table
_fake_table.error_name = _f_error_name
_fake_table.context_current = _f_context_current
_fake_table.mem_alloc = _f_mem_alloc
_fake_table.mem_free = _f_mem_free
_fake_table.host_alloc = _f_host_alloc
_fake_table.host_free = _f_host_free
_fake_table.stream_create = _f_stream_create
_fake_table.stream_destroy = _f_stream_destroy
_fake_table.stream_wait_event = _f_stream_wait_event
_fake_table.stream_synchronize = _f_stream_synchronize
_fake_table.event_create = _f_event_create
_fake_table.event_destroy = _f_event_destroy
_fake_table.event_record = _f_event_record
_fake_table.event_query = _f_event_query
_fake_table.event_synchronize = _f_event_synchronize
_fake_table.copy_htod = _f_copy_htod
_fake_table.copy_dtoh = _f_copy_dtoh
_fake_table.copy_dtod = _f_copy_dtod
_fake_table.module_load = _f_module_load
_fake_table.module_function = _f_module_function
_fake_table.launch = _f_launch


# -- kernel parameter blocks in numba's ABI ------------------------------------------------------
cdef struct Params:
    int64_t value[MAX_PARAMS]
    void* slot[MAX_PARAMS]
    int n


cdef inline void _scalar(Params* p, int64_t x) noexcept nogil:
    p.value[p.n] = x
    p.n += 1


cdef inline void _array1(Params* p, uint64_t data, int64_t n, int64_t itemsize, int64_t stride) noexcept nogil:
    _scalar(p, 0)          # meminfo
    _scalar(p, 0)          # parent
    _scalar(p, n)          # nitems
    _scalar(p, itemsize)
    _scalar(p, <int64_t>data)
    _scalar(p, n)          # shape
    _scalar(p, stride)     # strides (bytes)


cdef inline void _array2(Params* p, uint64_t data, int64_t rows, int64_t cols, int64_t itemsize,
                         int64_t row_stride) noexcept nogil:
    _scalar(p, 0)
    _scalar(p, 0)
    _scalar(p, rows * cols)
    _scalar(p, itemsize)
    _scalar(p, <int64_t>data)
    _scalar(p, rows)
    _scalar(p, cols)
    _scalar(p, row_stride)
    _scalar(p, itemsize)


cdef class KeyTables:
    """One AES-256 key's tables in device memory (made and filled by the Python layer):
    round keys (60 words), H's table (2048 words), chunk powers of H (``chunks`` x 4 words)."""

    cdef readonly uint64_t round_keys, h_table, powers
    cdef readonly int64_t chunks

    def __init__(self, uint64_t round_keys, uint64_t h_table, uint64_t powers, int64_t chunks):
        self.round_keys, self.h_table, self.powers, self.chunks = round_keys, h_table, powers, chunks

    def grown(self, uint64_t powers, int64_t chunks) -> None:
        """The powers now cover ``chunks`` (a bigger array, already filled on the kernel stream)."""
        self.powers, self.chunks = powers, chunks

    def max_bytes(self) -> int:
        """The longest message (ciphertext bytes) the powers cover with a 64-byte AAD."""
        return max(0, (self.chunks * CHUNK_BLOCKS - 4 - 1) * 16)


cdef struct Group:
    int64_t id
    int64_t row_start, rows
    size_t byte_end           # the staging ring's head when it was launched
    void* copied              # recorded on the copy stream behind its ciphertexts
    void* done                # recorded on the kernel stream behind its status copy
    bint live                 # launched, its ring space not yet reclaimed
    bint read                 # its outcome not yet handed out


cdef inline size_t _slot(size_t nbytes) noexcept nogil:
    return 16 if nbytes <= 16 else (nbytes + 15) // 16 * 16


cdef class H2DPath:
    """Host-to-device messages staged, verified, decrypted and committed on the GPU in
    groups (see the module docstring). One thread uses it (the copy engine)."""

    cdef Driver driver
    cdef DriverTable* t
    cdef void* ghash
    cdef void* tag
    cdef void* ctr
    cdef void* commit_fn
    cdef void* status_fn
    cdef uint64_t te, cipher, plain, rows_d, acc, ok, flags, status_d, zero_word
    cdef unsigned char* rows_h
    cdef int64_t* status_h
    cdef void* copies          # the copy stream (ciphertexts)
    cdef void* kernels         # the kernel stream (rows, launches, commits, status)
    cdef readonly size_t staging_bytes
    cdef readonly int64_t max_rows, group_rows, sessions, aad_bytes
    cdef Group groups[MAX_GROUPS]
    cdef int64_t next_group
    # the ring of staging bytes: [tail, head) in ring order is live
    cdef size_t head, tail, wrap_at
    cdef bint wrapped
    cdef int64_t live_groups
    cdef size_t saved_head, saved_wrap_at   # the ring before the group being staged (abandon)
    cdef bint saved_wrapped
    # the group being staged
    cdef int64_t row_start, count
    cdef int64_t run_start[MAX_RUNS]
    cdef int64_t run_max[MAX_RUNS]
    cdef list run_keys
    cdef int runs
    cdef int64_t calls_message, calls_group, calls_wait

    def __cinit__(self):
        self.t = NULL
        self.rows_h = NULL
        self.status_h = NULL

    def __init__(self, Driver driver not None, tuple functions not None, *, size_t staging_bytes,
                 int64_t max_rows=1024, int64_t sessions=64, int64_t aad_bytes=56, int64_t group_rows=0):
        if len(functions) != 5:
            raise ArgumentError(f"H2DPath needs the handles of {KERNELS}, got {len(functions)}")
        if staging_bytes < 16 or max_rows < 1 or sessions < 1:
            raise ArgumentError(f"staging_bytes >= 16, max_rows >= 1, sessions >= 1; got "
                                f"{staging_bytes}, {max_rows}, {sessions}")
        self.driver, self.t = driver, driver.t
        cdef uintptr_t f0 = functions[0], f1 = functions[1], f2 = functions[2], f3 = functions[3], f4 = functions[4]
        self.ghash, self.tag, self.ctr, self.commit_fn, self.status_fn = (<void*>f0, <void*>f1, <void*>f2,
                                                                          <void*>f3, <void*>f4)
        if not 0 <= aad_bytes <= AAD_BYTES:
            raise ArgumentError(f"aad_bytes must be 0..{AAD_BYTES}, got {aad_bytes}")
        self.staging_bytes, self.max_rows, self.sessions, self.aad_bytes = staging_bytes, max_rows, sessions, aad_bytes
        self.group_rows = max_rows if group_rows <= 0 else min(group_rows, max_rows)  # messages per group at most
        self.cipher = driver.alloc(staging_bytes + 16)
        self.plain = driver.alloc(staging_bytes + 16)
        self.rows_d = driver.alloc(max_rows * ROW_BYTES)
        self.acc = driver.alloc(max_rows * 16)
        self.ok = driver.alloc(max_rows * 4)
        self.flags = driver.alloc(sessions * 4)
        self.status_d = driver.alloc(MAX_GROUPS * 8)
        self.zero_word = driver.alloc(16)
        self.rows_h = <unsigned char*><uintptr_t>driver.host_alloc(max_rows * ROW_BYTES)
        self.status_h = <int64_t*><uintptr_t>driver.host_alloc(MAX_GROUPS * 8)
        self.copies = <void*><uintptr_t>driver.stream()
        self.kernels = <void*><uintptr_t>driver.stream()
        for i in range(MAX_GROUPS):
            self.groups[i].copied = <void*><uintptr_t>driver.event()
            self.groups[i].done = <void*><uintptr_t>driver.event()
            self.groups[i].live = self.groups[i].read = False
            self.groups[i].id = -1
        self.run_keys = []
        self.runs = 0
        self.count = 0
        self.row_start = 0
        self.head = self.tail = self.wrap_at = 0
        self.wrapped = False
        self.live_groups = 0
        self.next_group = 0
        self.calls_message = self.calls_group = self.calls_wait = 0

    def clear_device(self, bytes zeros_acc not None, bytes zeros_flags not None) -> None:
        """Zero the accumulators and refusal flags (queued on the kernel stream; the
        bytes are kept alive by the caller until the stream passed them)."""
        _check(self.t, self.t.copy_htod(self.acc, <const char*>zeros_acc, min(len(zeros_acc), self.max_rows * 16),
                                        self.kernels), "cuMemcpyHtoDAsync")
        _check(self.t, self.t.copy_htod(self.flags, <const char*>zeros_flags, min(len(zeros_flags), self.sessions * 4),
                                        self.kernels), "cuMemcpyHtoDAsync")
        _check(self.t, self.t.copy_htod(self.zero_word, <const char*>zeros_flags, 16, self.kernels),
               "cuMemcpyHtoDAsync")

    def set_te(self, uint64_t te) -> None:
        """The T-table's device address (filled by the caller on the kernel stream)."""
        self.te = te

    @property
    def kernel_stream(self) -> int:
        return <uintptr_t>self.kernels

    @property
    def copy_stream(self) -> int:
        return <uintptr_t>self.copies

    @property
    def staged(self) -> int:
        """Messages staged in the group not yet launched."""
        return self.count

    @property
    def calls(self) -> dict:
        """Driver calls made, by where: per message (stage), per group (launch), waiting."""
        return {"message": self.calls_message, "group": self.calls_group, "wait": self.calls_wait}

    # -- the staging ring ------------------------------------------------------------------
    # Live bytes are [tail, head) in ring order; ``wrapped``: they are [tail, wrap_at) and
    # [0, head), the bytes from wrap_at to the end unused. Groups end in launch order, so a
    # retired group's end is the new tail.
    cdef bint _fits_ring(self, size_t n, size_t* at) noexcept:
        if self.live_groups == 0 and self.count == 0:
            self.head = self.tail = 0
            self.wrapped = False
        if not self.wrapped:
            if self.head + n <= self.staging_bytes:
                at[0] = self.head
                return True
            if n <= self.tail:
                at[0] = 0
                return True
            return False
        if self.head + n <= self.tail:
            at[0] = self.head
            return True
        return False

    cdef void _advance(self, size_t at, size_t n) noexcept:
        if at < self.head:
            self.wrapped = True
            self.wrap_at = self.head
        self.head = at + n

    cdef int _retire_oldest(self, bint block) except -1:
        """Reclaim the oldest live group's ring space once its done event passed; with
        ``block`` wait for it (GIL released). Returns 1 if one was retired."""
        cdef Group* g
        cdef int result
        cdef int64_t oldest = -1, i
        cdef size_t end
        for i in range(MAX_GROUPS):
            if self.groups[i].live and (oldest < 0 or self.groups[i].id < self.groups[oldest].id):
                oldest = i
        if oldest < 0:
            return 0
        g = &self.groups[oldest]
        result = self.t.event_query(g.done)
        if result == NOT_READY:
            if not block:
                return 0
            self.calls_wait += 1
            with nogil:
                result = self.t.event_synchronize(g.done)
        _check(self.t, result, "waiting for a group")
        g.live = False
        self.live_groups -= 1
        end = g.byte_end
        if self.wrapped and end > self.tail:      # it ended in the upper part
            self.tail = end
            if self.tail >= self.wrap_at:
                self.tail, self.wrapped = 0, False
        else:                                     # in the lower part: the upper part is all free
            self.tail, self.wrapped = end, False
        return 1

    cdef bint _rows_free(self, int64_t start, int64_t stop):
        for i in range(MAX_GROUPS):
            g = &self.groups[i]
            if g.live and g.row_start < stop and start < g.row_start + g.rows:
                return False
        return True

    def room(self, size_t nbytes) -> bool:
        """Whether the group being staged takes one more message of ``nbytes`` (ciphertext)
        under any key; if not, launch it first. Reclaims the space of finished groups
        (querying their events) and waits for the oldest only when the ring is full and
        nothing is staged to launch instead."""
        cdef size_t at
        if _slot(nbytes) > self.staging_bytes:
            raise ArgumentError(f"a {nbytes}-byte message does not fit the {self.staging_bytes}-byte staging")
        if self.runs == MAX_RUNS or self.count >= self.group_rows:
            return False
        if self.count >= self.max_rows - self.row_start:
            return self.count == 0 and self._restart_rows()
        while not self._fits_ring(_slot(nbytes), &at) or not self._rows_free(self.row_start,
                                                                              self.row_start + self.count + 1):
            if self.count:
                return False       # launch what is staged; its space comes back in order
            if not self._retire_oldest(True):
                raise DeviceError("the staging ring is full with nothing in flight (a bug)")
        return True

    def reset_flag(self, int64_t session) -> None:
        """Clear a session slot's refusal flag (queued on the kernel stream, before the
        slot's first group): the slot served a session that failed."""
        if not 0 <= session < self.sessions:
            raise ArgumentError(f"session slot {session} is outside 0..{self.sessions - 1}")
        _check(self.t, self.t.copy_dtod(self.flags + session * 4, self.zero_word, 4, self.kernels),
               "cuMemcpyDtoDAsync")

    cdef bint _restart_rows(self) except -1:
        # an empty group at the end of the rows starts again at row 0 once that is free
        self.row_start = 0
        while not self._rows_free(0, 1):
            self._retire_oldest(True)
        return True

    def stage(self, KeyTables key not None, const unsigned char[::1] iv not None,
              const unsigned char[::1] aad not None, const unsigned char[::1] payload not None,
              size_t nbytes) -> tuple:
        """Queue the copy of a message (``nbytes`` of ciphertext then its 16-byte tag, in
        ``payload``: keep it unchanged until the group's ``copied`` event passed) into
        staging and write its row. Returns (position in the group, staging offset).
        :meth:`room` must have said yes."""
        cdef size_t at
        cdef int64_t position = self.count
        cdef unsigned char* row
        if iv.shape[0] != 12 or aad.shape[0] != self.aad_bytes or payload.shape[0] < nbytes + 16:
            raise ArgumentError(f"a message needs a 12-byte IV (got {iv.shape[0]}), a {self.aad_bytes}-byte "
                                f"AAD (got {aad.shape[0]}) and its ciphertext and tag "
                                f"({nbytes + 16} bytes, got {payload.shape[0]})")
        if not self._fits_ring(_slot(nbytes), &at) or self.row_start + position >= self.max_rows:
            raise DeviceError("stage() without room(): launch the group first")
        if nbytes:
            _check(self.t, self.t.copy_htod(self.cipher + at, &payload[0], nbytes, self.copies), "cuMemcpyHtoDAsync")
            self.calls_message += 1
        if self.count == 0:
            self.saved_head, self.saved_wrapped, self.saved_wrap_at = self.head, self.wrapped, self.wrap_at
        self._advance(at, _slot(nbytes))
        row = self.rows_h + (self.row_start + position) * ROW_BYTES
        memset(row, 0, ROW_BYTES)
        _be_words(row + ROW_IV, &iv[0], 12)
        if aad.shape[0]:
            _be_words(row + ROW_AAD, &aad[0], aad.shape[0])
        _be_words(row + ROW_TAG, &payload[nbytes], 16)
        (<int64_t*>(row + ROW_OFF))[0] = at
        (<int64_t*>(row + ROW_LEN))[0] = nbytes
        if nbytes > key.max_bytes():
            raise DeviceError(f"a {nbytes}-byte message needs the key's powers grown first "
                              f"(they cover {key.max_bytes()} bytes)")
        if self.runs == 0 or key is not self.run_keys[self.runs - 1]:
            if self.runs == MAX_RUNS:
                raise DeviceError("stage() without room(): too many keys in the group")
            self.run_keys.append(key)
            self.run_start[self.runs] = position
            self.run_max[self.runs] = 0
            self.runs += 1
        if <int64_t>nbytes > self.run_max[self.runs - 1]:
            self.run_max[self.runs - 1] = nbytes
        self.count += 1
        return position, at

    def commit(self, int64_t position, uint64_t destination, int64_t upto) -> None:
        """Commit message ``position``'s plaintext to device address ``destination`` if
        messages 0..``upto`` of the group verified (and the session's flag is clear)."""
        if not (0 <= position <= upto < self.count) or destination == 0:
            raise ArgumentError(f"commit of message {position} up to {upto}: the group has {self.count} "
                                f"messages (and the destination must not be 0)")
        row = self.rows_h + (self.row_start + position) * ROW_BYTES
        (<int64_t*>(row + ROW_DST))[0] = <int64_t>destination
        (<int64_t*>(row + ROW_UPTO))[0] = upto

    def offset_of(self, int64_t position) -> int:
        return (<int64_t*>(self.rows_h + (self.row_start + position) * ROW_BYTES + ROW_OFF))[0]

    def launch(self, int64_t session) -> int:
        """Queue the group's verification, decryption, commits and status (see the
        module docstring); returns its id for :meth:`result`. Nothing is waited for."""
        cdef Group* g
        cdef Params p
        cdef int64_t n = self.count, a, b, r, slot, chunks, blocks
        cdef uint64_t rows = self.rows_d + self.row_start * ROW_BYTES
        cdef uint64_t acc = self.acc + self.row_start * 16, ok = self.ok + self.row_start * 4
        cdef KeyTables key
        if not 0 <= session < self.sessions:
            raise ArgumentError(f"session slot {session} is outside 0..{self.sessions - 1}")
        if n == 0:
            raise ArgumentError("launch() of an empty group")
        slot = self.next_group % MAX_GROUPS
        g = &self.groups[slot]
        while g.live:
            self._retire_oldest(True)
        if g.read:
            raise DeviceError(f"group {g.id}'s outcome was never read: read results in order")
        t = self.t
        self.calls_group += 9 + 3 * (self.runs - 1)
        _check(t, t.event_record(g.copied, self.copies), "cuEventRecord")
        _check(t, t.stream_wait_event(self.kernels, g.copied), "cuStreamWaitEvent")
        _check(t, t.copy_htod(rows, self.rows_h + self.row_start * ROW_BYTES, n * ROW_BYTES, self.kernels),
               "cuMemcpyHtoDAsync")
        for r in range(self.runs):
            key = self.run_keys[r]
            a = self.run_start[r]
            b = self.run_start[r + 1] if r + 1 < self.runs else n
            self._launch_run(key, rows + a * ROW_BYTES, acc + a * 16, ok + a * 4, b - a, self.run_max[r])
        # commit: messages whose transfer verified, while the session's flag is clear
        p.n = 0
        _array1(&p, ok, n, 4, 4)
        _array2(&p, rows, n, ROW_BYTES // 8, 8, ROW_BYTES)
        _array1(&p, self.plain, self.staging_bytes + 16, 1, 1)
        _array1(&p, self.flags + session * 4, 1, 4, 4)
        blocks = max(1, min(COMMIT_BLOCKS, (self._group_max() + THREADS - 1) // THREADS))
        self._go(self.commit_fn, blocks, n, THREADS, &p, "commit_kernel")
        # status: the first refused message (-1: none), which raises the session's flag
        p.n = 0
        _array1(&p, ok, n, 4, 4)
        _array1(&p, self.flags + session * 4, 1, 4, 4)
        _array1(&p, self.status_d + slot * 8, 1, 8, 8)
        self._go(self.status_fn, 1, 1, 1, &p, "status_kernel")
        _check(t, t.copy_dtoh(&self.status_h[slot], self.status_d + slot * 8, 8, self.kernels), "cuMemcpyDtoHAsync")
        _check(t, t.event_record(g.done, self.kernels), "cuEventRecord")
        g.id, g.row_start, g.rows, g.byte_end, g.live, g.read = self.next_group, self.row_start, n, self.head, True, True
        self.live_groups += 1
        self.next_group += 1
        self.row_start += n
        if self.row_start >= self.max_rows:
            self.row_start = 0
        self.count = 0
        self.runs = 0
        self.run_keys = []
        return g.id

    cdef int64_t _group_max(self):
        cdef int64_t m = 0
        for r in range(self.runs):
            if self.run_max[r] > m:
                m = self.run_max[r]
        return m

    cdef int _launch_run(self, KeyTables key, uint64_t rows, uint64_t acc, uint64_t ok, int64_t n,
                         int64_t longest) except -1:
        cdef Params p
        cdef int64_t chunks = ((self.aad_bytes + 15) // 16 + (longest + 15) // 16 + 1 + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS
        cdef int64_t ctr_blocks = max(1, ((longest + 15) // 16 + THREADS - 1) // THREADS)
        if chunks > key.chunks:
            raise DeviceError(f"the key's powers cover {key.chunks} chunks, the group needs {chunks}")
        # ghash_kernel(h_table, powers, data32, offs, lens, aad32, aad_len, acc)
        p.n = 0
        _array1(&p, key.h_table, 2048, 4, 4)
        _array2(&p, key.powers, key.chunks, 4, 4, 16)
        _array1(&p, self.cipher, (self.staging_bytes + 16) // 4, 4, 4)
        _array1(&p, rows + ROW_OFF, n, 8, ROW_BYTES)
        _array1(&p, rows + ROW_LEN, n, 8, ROW_BYTES)
        _array2(&p, rows + ROW_AAD, n, AAD_BYTES // 4, 4, ROW_BYTES)
        _scalar(&p, self.aad_bytes)
        _array2(&p, acc, n, 4, 4, 16)
        self._go(self.ghash, (chunks + THREADS - 1) // THREADS, n, THREADS, &p, "ghash_kernel")
        # tag_kernel(te, rk, ivs, acc, tags, ok, check=1)
        p.n = 0
        _array1(&p, self.te, 256, 4, 4)
        _array1(&p, key.round_keys, 60, 4, 4)
        _array2(&p, rows + ROW_IV, n, 3, 4, ROW_BYTES)
        _array2(&p, acc, n, 4, 4, 16)
        _array2(&p, rows + ROW_TAG, n, 4, 4, ROW_BYTES)
        _array1(&p, ok, n, 4, 4)
        _scalar(&p, 1)
        self._go(self.tag, (n + THREADS - 1) // THREADS, 1, THREADS, &p, "tag_kernel")
        # ctr_kernel(te, rk, ivs, src32, src_offs, dst8, dst32, dst_offs, lens, ok)
        p.n = 0
        _array1(&p, self.te, 256, 4, 4)
        _array1(&p, key.round_keys, 60, 4, 4)
        _array2(&p, rows + ROW_IV, n, 3, 4, ROW_BYTES)
        _array1(&p, self.cipher, (self.staging_bytes + 16) // 4, 4, 4)
        _array1(&p, rows + ROW_OFF, n, 8, ROW_BYTES)
        _array1(&p, self.plain, self.staging_bytes + 16, 1, 1)
        _array1(&p, self.plain, (self.staging_bytes + 16) // 4, 4, 4)
        _array1(&p, rows + ROW_OFF, n, 8, ROW_BYTES)
        _array1(&p, rows + ROW_LEN, n, 8, ROW_BYTES)
        _array1(&p, ok, n, 4, 4)
        self._go(self.ctr, ctr_blocks, n, THREADS, &p, "ctr_kernel")
        return 0

    cdef int _go(self, void* function, int64_t gx, int64_t gy, int64_t bx, Params* p, str what) except -1:
        for i in range(p.n):
            p.slot[i] = &p.value[i]
        return _check(self.t, self.t.launch(function, <unsigned int>gx, <unsigned int>gy, 1, <unsigned int>bx, 1, 1,
                                            0, self.kernels, p.slot), f"cuLaunchKernel({what})")

    def result(self, int64_t group, bint block=True):
        """The outcome of ``group`` once its done event passed: -1 (every message
        verified; its commits are done on the kernel stream) or the position of the first
        refused message (those before it committed as the contract says, nothing after);
        None if it has not finished and ``block`` is false. Outcomes are read in order."""
        cdef Group* g = &self.groups[group % MAX_GROUPS]
        cdef int result
        if g.id != group or not g.read:
            raise ArgumentError(f"group {group} is not awaiting its outcome")
        if g.live:
            result = self.t.event_query(g.done)
            if result == NOT_READY:
                if not block:
                    return None
                self.calls_wait += 1
                with nogil:
                    result = self.t.event_synchronize(g.done)
            _check(self.t, result, "waiting for a group")
            # its space comes back in ring order: retire the older ones (done before it)
            while g.live:
                self._retire_oldest(True)
        g.read = False
        return self.status_h[group % MAX_GROUPS]

    def copied(self, int64_t group) -> bool:
        """Whether ``group``'s ciphertext copies have run (one event query, no wait): from
        then on the host memory its messages were staged from may be reused."""
        cdef Group* g = &self.groups[group % MAX_GROUPS]
        cdef int result
        if g.id != group:
            return True  # long done: its slot was reused by a later group
        result = self.t.event_query(g.copied)
        if result == NOT_READY:
            return False
        _check(self.t, result, "cuEventQuery")
        return True

    def abandon(self) -> None:
        """Forget the group being staged (its copies may still read their slots: the copy
        stream is waited for), as after an op failed part-way."""
        cdef int result
        with nogil:
            result = self.t.stream_synchronize(self.copies)
        _check(self.t, result, "cuStreamSynchronize")
        self.count = 0
        self.runs = 0
        self.run_keys = []
        if self.count:
            self.head, self.wrapped, self.wrap_at = self.saved_head, self.saved_wrapped, self.saved_wrap_at
        self.count = 0

    def close(self) -> None:
        """Wait for everything queued, free the path's memory (idempotent)."""
        if self.t == NULL:
            return
        t, driver = self.t, self.driver
        self.t = NULL
        try:
            driver.synchronize(<uintptr_t>self.copies)
            driver.synchronize(<uintptr_t>self.kernels)
        finally:
            for address in (self.cipher, self.plain, self.rows_d, self.acc, self.ok, self.flags, self.status_d,
                            self.zero_word):
                driver.free(address)
            driver.host_free(<uintptr_t>self.rows_h)
            driver.host_free(<uintptr_t>self.status_h)
            for i in range(MAX_GROUPS):
                driver.event_destroy(<uintptr_t>self.groups[i].copied)
                driver.event_destroy(<uintptr_t>self.groups[i].done)
            driver.stream_destroy(<uintptr_t>self.copies)
            driver.stream_destroy(<uintptr_t>self.kernels)


cdef class D2HSealer:
    """Device memory sealed for the host, one message at a time, on the kernel stream
    (behind every commit queued before it): the bytes copied to aligned staging, CTR,
    GHASH over the ciphertext, the tag; ciphertext and tag copied into host memory; one
    wait at the end (the host needs the bytes). Shares its kernels and stream with an
    :class:`H2DPath`."""

    cdef Driver driver
    cdef DriverTable* t
    cdef void* ghash
    cdef void* tag
    cdef void* ctr
    cdef void* stream
    cdef void* done
    cdef uint64_t te, plain, sealed, row_d, acc, ones
    cdef unsigned char* row_h
    cdef readonly size_t capacity
    cdef int64_t calls

    def __cinit__(self):
        self.t = NULL
        self.row_h = NULL

    def __init__(self, Driver driver not None, tuple functions not None, uintptr_t stream, uint64_t te,
                 size_t capacity, bytes init not None):
        """``functions``: (ghash, tag, ctr) handles; ``init``: 16 zero bytes then a uint32
        1 (kept alive by the caller until the stream passed it)."""
        if len(init) != 20:
            raise ArgumentError(f"init must be 20 bytes (16 zeros, then uint32 1), got {len(init)}")
        cdef uintptr_t f0 = functions[0], f1 = functions[1], f2 = functions[2]
        self.driver, self.t = driver, driver.t
        self.ghash, self.tag, self.ctr = <void*>f0, <void*>f1, <void*>f2
        self.stream, self.te, self.capacity = <void*>stream, te, capacity
        self.plain = driver.alloc(capacity + 16)
        self.sealed = driver.alloc(capacity + 16)
        self.row_d = driver.alloc(ROW_BYTES)
        self.acc = driver.alloc(16)
        self.ones = driver.alloc(16)
        self.row_h = <unsigned char*><uintptr_t>driver.host_alloc(ROW_BYTES)
        self.done = <void*><uintptr_t>driver.event()
        _check(self.t, self.t.copy_htod(self.acc, <const char*>init, 16, self.stream), "cuMemcpyHtoDAsync")
        _check(self.t, self.t.copy_htod(self.ones, (<const char*>init) + 16, 4, self.stream), "cuMemcpyHtoDAsync")
        self.calls = 0

    @property
    def calls_made(self) -> int:
        return self.calls

    def seal(self, KeyTables key not None, const unsigned char[::1] iv not None,
             const unsigned char[::1] aad not None, uint64_t src, size_t nbytes,
             unsigned char[::1] out not None) -> None:
        """Seal ``nbytes`` of device memory at ``src`` into ``out`` (ciphertext || tag)."""
        cdef Params p
        cdef int result
        cdef int64_t chunks = (AAD_BYTES // 16 + (<int64_t>nbytes + 15) // 16 + 1 + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS
        cdef uint32_t word
        cdef int i
        if iv.shape[0] != 12 or aad.shape[0] > AAD_BYTES or <size_t>out.shape[0] != nbytes + 16:
            raise ArgumentError(f"sealing needs a 12-byte IV (got {iv.shape[0]}), an AAD of at most {AAD_BYTES} "
                                f"bytes (got {aad.shape[0]}) and room for the ciphertext and tag "
                                f"({nbytes + 16} bytes, got {out.shape[0]})")
        if nbytes > self.capacity:
            raise ArgumentError(f"a {nbytes}-byte message is larger than the sealer's {self.capacity} bytes")
        if chunks > key.chunks:
            raise DeviceError(f"the key's powers cover {key.chunks} chunks, sealing needs {chunks}")
        t = self.t
        memset(self.row_h, 0, ROW_BYTES)
        _be_words(self.row_h + ROW_IV, &iv[0], 12)
        if aad.shape[0]:
            _be_words(self.row_h + ROW_AAD, &aad[0], aad.shape[0])
        (<int64_t*>(self.row_h + ROW_LEN))[0] = nbytes
        if nbytes:
            _check(t, t.copy_dtod(self.plain, src, nbytes, self.stream), "cuMemcpyDtoDAsync")
        _check(t, t.copy_htod(self.row_d, self.row_h, ROW_BYTES, self.stream), "cuMemcpyHtoDAsync")
        p.n = 0
        _array1(&p, self.te, 256, 4, 4)
        _array1(&p, key.round_keys, 60, 4, 4)
        _array2(&p, self.row_d + ROW_IV, 1, 3, 4, ROW_BYTES)
        _array1(&p, self.plain, (self.capacity + 16) // 4, 4, 4)
        _array1(&p, self.row_d + ROW_OFF, 1, 8, ROW_BYTES)
        _array1(&p, self.sealed, self.capacity + 16, 1, 1)
        _array1(&p, self.sealed, (self.capacity + 16) // 4, 4, 4)
        _array1(&p, self.row_d + ROW_OFF, 1, 8, ROW_BYTES)
        _array1(&p, self.row_d + ROW_LEN, 1, 8, ROW_BYTES)
        _array1(&p, self.ones, 1, 4, 4)
        self._go(self.ctr, max(1, ((<int64_t>nbytes + 15) // 16 + THREADS - 1) // THREADS), THREADS, &p, "ctr_kernel")
        p.n = 0
        _array1(&p, key.h_table, 2048, 4, 4)
        _array2(&p, key.powers, key.chunks, 4, 4, 16)
        _array1(&p, self.sealed, (self.capacity + 16) // 4, 4, 4)
        _array1(&p, self.row_d + ROW_OFF, 1, 8, ROW_BYTES)
        _array1(&p, self.row_d + ROW_LEN, 1, 8, ROW_BYTES)
        _array2(&p, self.row_d + ROW_AAD, 1, AAD_BYTES // 4, 4, ROW_BYTES)
        _scalar(&p, aad.shape[0])
        _array2(&p, self.acc, 1, 4, 4, 16)
        self._go(self.ghash, (chunks + THREADS - 1) // THREADS, THREADS, &p, "ghash_kernel")
        p.n = 0
        _array1(&p, self.te, 256, 4, 4)
        _array1(&p, key.round_keys, 60, 4, 4)
        _array2(&p, self.row_d + ROW_IV, 1, 3, 4, ROW_BYTES)
        _array2(&p, self.acc, 1, 4, 4, 16)
        _array2(&p, self.row_d + ROW_TAG, 1, 4, 4, ROW_BYTES)
        _array1(&p, self.ones, 1, 4, 4)
        _scalar(&p, 0)
        self._go(self.tag, 1, THREADS, &p, "tag_kernel")
        if nbytes:
            _check(t, t.copy_dtoh(&out[0], self.sealed, nbytes, self.stream), "cuMemcpyDtoHAsync")
        _check(t, t.copy_dtoh(self.row_h + ROW_TAG, self.row_d + ROW_TAG, 16, self.stream), "cuMemcpyDtoHAsync")
        _check(t, t.event_record(self.done, self.stream), "cuEventRecord")
        self.calls += 9 if nbytes else 7
        with nogil:
            result = t.event_synchronize(self.done)
        _check(t, result, "waiting for a sealed read")
        for i in range(4):  # the tag's words, big-endian on the wire
            memcpy(&word, self.row_h + ROW_TAG + 4 * i, 4)
            out[nbytes + 4 * i] = (word >> 24) & 0xFF
            out[nbytes + 4 * i + 1] = (word >> 16) & 0xFF
            out[nbytes + 4 * i + 2] = (word >> 8) & 0xFF
            out[nbytes + 4 * i + 3] = word & 0xFF

    cdef int _go(self, void* function, int64_t gx, int64_t bx, Params* p, str what) except -1:
        for i in range(p.n):
            p.slot[i] = &p.value[i]
        return _check(self.t, self.t.launch(function, <unsigned int>gx, 1, 1, <unsigned int>bx, 1, 1, 0,
                                            self.stream, p.slot), f"cuLaunchKernel({what})")

    def close(self) -> None:
        if self.t == NULL:
            return
        driver = self.driver
        self.t = NULL
        for address in (self.plain, self.sealed, self.row_d, self.acc, self.ones):
            driver.free(address)
        driver.host_free(<uintptr_t>self.row_h)
        driver.event_destroy(<uintptr_t>self.done)


cdef inline void _be_words(unsigned char* out, const unsigned char* data, Py_ssize_t n) noexcept nogil:
    """``data`` (``n`` bytes) as big-endian 32-bit words in native order (the kernels'
    layout), zero-padded to a whole word."""
    cdef Py_ssize_t i, j
    cdef uint32_t word
    for i in range(0, n, 4):
        word = 0
        for j in range(4):
            word <<= 8
            if i + j < n:
                word |= data[i + j]
        memcpy(out + i, &word, 4)
