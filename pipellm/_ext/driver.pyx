# cython: language_level=3, boundscheck=False, wraparound=False
"""The table of driver calls the cuda device's hot path makes (``drivertable.pxd``) and
the object that owns it: :class:`Driver`, made on the real driver (``cudadriver``'s
table, where it is built) or on a Python fake (``pipellm.devices.fakedriver``) through
the trampolines below, which call the fake's methods with the GIL and count the calling
thread's CPU in them (so a benchmark can take the fake's share out of the host's time).
Driver results become exceptions in one place (:func:`check`).
"""

from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.string cimport memset
from posix.time cimport CLOCK_THREAD_CPUTIME_ID, clock_gettime, timespec

from pipellm._ext.drivertable cimport DriverTable, FAKE_RAISED, NOT_READY, SUCCESS
from pipellm._ext.kernelparams cimport Params

from threading import get_ident

from pipellm.errors import ArgumentTypeError, DeviceError, DeviceUnavailableError

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char* text, size_t most)

cdef object _raised = None  # what a fake's callback raised (see FAKE_RAISED)
cdef object _fake = None    # the fake the trampolines call


def installed_fake():
    """The fake driver the table calls now (None before the first ``Driver.fake``)."""
    return _fake


cdef int check(DriverTable* t, int result, str what) except -1:
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


cdef int launch(DriverTable* t, void* function, int64_t gx, int64_t gy, int64_t bx, Params* p, void* stream,
                str what) except -1:
    """Launch ``function`` on a (gx, gy) grid of bx-thread blocks with the packed block ``p``."""
    for i in range(p.n):
        p.slot[i] = &p.value[i]
    return check(t, t.launch(function, <unsigned int>gx, <unsigned int>gy, 1, <unsigned int>bx, 1, 1, 0, stream,
                             p.slot), f"cuLaunchKernel({what})")


cdef int record_and_wait(DriverTable* t, void* event, void* stream, str what) except -1:
    """Record ``event`` behind the work queued on ``stream`` and wait for it (GIL released)."""
    cdef int result
    check(t, t.event_record(event, stream), "cuEventRecord")
    with nogil:
        result = t.event_synchronize(event)
    return check(t, result, what)


cdef class Driver:
    """A table of driver calls and what keeps it valid. Made by :meth:`real` or
    :meth:`fake`; the constructor is refused."""

    def __init__(self, *args, **kw):
        raise ArgumentTypeError("Driver is made by Driver.real(device_id) or Driver.fake(fake)")

    @staticmethod
    def real(int device_id=0):
        """The CUDA driver (needs pipellm._ext.cudadriver, built where the CUDA headers were;
        DeviceUnavailableError, saying why, where it or the driver is missing)."""
        try:
            from pipellm._ext import cudadriver
        except ImportError as exc:
            raise DeviceUnavailableError(f"the cydriver layer (pipellm._ext.cudadriver) is not built here: {exc} "
                                         f"(it needs cuda-bindings and the CUDA headers at build time)") from None
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

    # set-up calls (not on the per-message path)
    def use_context(self) -> None:
        """Make the device's primary context current on the calling thread."""
        check(self.t, self.t.context_current(self.device), "cuCtxSetCurrent")

    def alloc(self, size_t nbytes) -> int:
        cdef uint64_t address = 0
        check(self.t, self.t.mem_alloc(&address, max(nbytes, 16)), f"cuMemAlloc({nbytes})")
        return address

    def free(self, uint64_t address) -> None:
        check(self.t, self.t.mem_free(address), "cuMemFree")

    def host_alloc(self, size_t nbytes) -> int:
        cdef void* pointer = NULL
        check(self.t, self.t.host_alloc(&pointer, max(nbytes, 16)), f"cuMemHostAlloc({nbytes})")
        memset(pointer, 0, max(nbytes, 16))
        return <uintptr_t>pointer

    def host_free(self, uintptr_t pointer) -> None:
        check(self.t, self.t.host_free(<void*>pointer), "cuMemFreeHost")

    def stream(self) -> int:
        cdef void* handle = NULL
        check(self.t, self.t.stream_create(&handle), "cuStreamCreate")
        return <uintptr_t>handle

    def stream_destroy(self, uintptr_t stream) -> None:
        check(self.t, self.t.stream_destroy(<void*>stream), "cuStreamDestroy")

    def event(self) -> int:
        cdef void* handle = NULL
        check(self.t, self.t.event_create(&handle), "cuEventCreate")
        return <uintptr_t>handle

    def event_destroy(self, uintptr_t event) -> None:
        check(self.t, self.t.event_destroy(<void*>event), "cuEventDestroy")

    def synchronize(self, uintptr_t stream) -> None:
        cdef int result
        with nogil:
            result = self.t.stream_synchronize(<void*>stream)
        check(self.t, result, "cuStreamSynchronize")

    def copy_htod(self, uint64_t dst, const unsigned char[::1] src not None, uintptr_t stream) -> None:
        """Queue a copy of host bytes (keep them alive and unchanged until the stream passed it)."""
        if src.shape[0]:
            check(self.t, self.t.copy_htod(dst, &src[0], src.shape[0], <void*>stream), "cuMemcpyHtoDAsync")

    def copy_dtoh(self, unsigned char[::1] dst not None, uint64_t src, uintptr_t stream) -> None:
        if dst.shape[0]:
            check(self.t, self.t.copy_dtoh(&dst[0], src, dst.shape[0], <void*>stream), "cuMemcpyDtoHAsync")

    def copy_dtod(self, uint64_t dst, uint64_t src, size_t nbytes, uintptr_t stream) -> None:
        if nbytes:
            check(self.t, self.t.copy_dtod(dst, src, nbytes, <void*>stream), "cuMemcpyDtoDAsync")

    def load(self, bytes image not None, names) -> tuple:
        """Load a module image (PTX, NUL-terminated here) and return its functions' handles."""
        cdef void* module = NULL
        cdef void* function = NULL
        image = image + b"\0"
        check(self.t, self.t.module_load(&module, <const char*>image), "cuModuleLoadData")
        handles = []
        for name in names:
            encoded = name.encode()
            check(self.t, self.t.module_function(&function, module, encoded), f"cuModuleGetFunction({name})")
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
    exception is kept for :func:`check` to raise (C callers see FAKE_RAISED)."""
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


cdef int _f_launch(void* function, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                   unsigned int by, unsigned int bz, unsigned int shared, void* stream,
                   void** params) noexcept nogil:
    cdef double start = _cpu()
    cdef uint64_t count = 0
    cdef int result, i
    with gil:
        result = _call("param_count", (<uintptr_t>function,), start, &count)
        if result != SUCCESS:
            return result
        start = _cpu()
        # the parameter block is read now, as the driver does: it may be reused on return
        values = [(<int64_t*>params[i])[0] for i in range(count)]
        return _call("launch", (<uintptr_t>function, (gx, gy, gz), (bx, by, bz), shared, <uintptr_t>stream, values),
                     start, NULL)


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


