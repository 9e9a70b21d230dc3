# cython: language_level=3
"""XLA FFI custom-call handlers for the compiled core (``jax.ffi``).

Optional: built only when JAX's FFI headers (``jax.ffi.include_dir()``) are
found at build time (``setup.py``, ``docs/engines.md``); nothing else needs it.

One handler per structure, with the C signature of ``XLA_FFI_Handler``
(``xla/ffi/api/c_api.h``): XLA hands it a call frame with the operand and
result buffers (row-major, already allocated by XLA) and the attributes
``op`` (string: value, grad, hvp, decode, path), ``reg`` (int32), ``gamma``
(float64) and, for DTW, ``band`` (int64).

Operands: ``theta`` (``(*lead, B, ...)``), then ``Z`` for ``op = "hvp"``,
then the per-item integer arrays (DTW ``len_a, len_b``, Viterbi ``lengths``:
``(*lead, B)``), then the shared ones (DAG ``indptr, parents``); the integer
arrays may instead come as array attributes ``int0, int1, ...`` in that
order (``smoothmax.jax`` does so inside ``shard_map``). Leading dimensions
(``vmap``) are folded into the batch. Results: ``value`` (and
``E``) for value/grad, ``Edot`` for hvp, ``(score, path)`` for decode/path.

The handler takes the GIL, wraps the buffers as NumPy arrays (no copies)
and calls the structure's entry point in this package with XLA's result
buffers as ``out`` (``smoothmax._buffers.pass_outputs``); the passes run
without the GIL, as for NumPy callers. Integer inputs arrive as int32 when
``jax_enable_x64`` is off and are widened (a copy of ``B`` ints); decode
results are copied into the result buffers (their int type may differ). A
Python exception (bad scores found by the Viterbi kernels, a failed
allocation) becomes an XLA error carrying its message.

The CUDA handlers (DTW, Viterbi) do the same on the GPU: they ask XLA for
its stream and device, view the device buffers as CuPy arrays, call the GPU
engine (``smoothmax._cuda.engine``, imported on first use) with XLA's stream
as CuPy's current one, and copy its results into XLA's result buffers on
that stream; no data goes through the host.

The handlers never import a framework; ``smoothmax.jax`` registers the
capsules of ``handlers(platform)`` with ``jax.ffi.register_ffi_target``.
"""
from cpython.buffer cimport PyBUF_WRITE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.pycapsule cimport PyCapsule_New
from libc.stdint cimport int32_t, int64_t, uint32_t

import numpy as np

from .. import _extremes
from .._buffers import empty as _scratch
from .._values import check_values as _check_values
from . import dag as _dag
from . import dtw as _dtw
from . import viterbi as _viterbi


cdef extern from "xla/ffi/api/c_api.h" nogil:
    ctypedef enum XLA_FFI_Extension_Type:
        XLA_FFI_Extension_Metadata

    ctypedef struct XLA_FFI_Extension_Base:
        XLA_FFI_Extension_Type type
        XLA_FFI_Extension_Base* next

    ctypedef struct XLA_FFI_Api_Version:
        size_t struct_size
        XLA_FFI_Extension_Base* extension_start
        int major_version
        int minor_version

    ctypedef struct XLA_FFI_TypeId:
        int64_t type_id

    ctypedef struct XLA_FFI_Metadata:
        XLA_FFI_Api_Version api_version
        uint32_t traits
        XLA_FFI_TypeId state_type_id

    ctypedef struct XLA_FFI_Metadata_Extension:
        XLA_FFI_Extension_Base extension_base
        XLA_FFI_Metadata* metadata

    ctypedef enum XLA_FFI_DataType:
        XLA_FFI_DataType_S32
        XLA_FFI_DataType_S64
        XLA_FFI_DataType_F32
        XLA_FFI_DataType_F64

    ctypedef struct XLA_FFI_Buffer:
        XLA_FFI_DataType dtype
        void* data
        int64_t rank
        int64_t* dims

    ctypedef struct XLA_FFI_ByteSpan:
        const char* ptr
        size_t len

    ctypedef struct XLA_FFI_Scalar:
        XLA_FFI_DataType dtype
        void* value

    ctypedef struct XLA_FFI_Array:
        XLA_FFI_DataType dtype
        size_t size
        void* data

    ctypedef enum XLA_FFI_AttrType:
        XLA_FFI_AttrType_ARRAY
        XLA_FFI_AttrType_SCALAR
        XLA_FFI_AttrType_STRING

    ctypedef struct XLA_FFI_Args:
        int64_t size
        void** args

    ctypedef struct XLA_FFI_Rets:
        int64_t size
        void** rets

    ctypedef struct XLA_FFI_Attrs:
        int64_t size
        XLA_FFI_AttrType* types
        XLA_FFI_ByteSpan** names
        void** attrs

    ctypedef enum XLA_FFI_ExecutionStage:
        XLA_FFI_ExecutionStage_EXECUTE

    ctypedef enum XLA_FFI_Error_Code:
        XLA_FFI_Error_Code_INVALID_ARGUMENT
        XLA_FFI_Error_Code_INTERNAL

    ctypedef struct XLA_FFI_Error:
        pass

    ctypedef struct XLA_FFI_Error_Create_Args:
        size_t struct_size
        XLA_FFI_Extension_Base* extension_start
        const char* message
        XLA_FFI_Error_Code errc

    ctypedef struct XLA_FFI_ExecutionContext:
        pass

    ctypedef struct XLA_FFI_Stream_Get_Args:
        size_t struct_size
        XLA_FFI_Extension_Base* extension_start
        XLA_FFI_ExecutionContext* ctx
        void* stream

    ctypedef struct XLA_FFI_DeviceOrdinal_Get_Args:
        size_t struct_size
        XLA_FFI_Extension_Base* extension_start
        XLA_FFI_ExecutionContext* ctx
        int32_t device_ordinal

    ctypedef struct XLA_FFI_Api:
        XLA_FFI_Error* (*XLA_FFI_Error_Create)(XLA_FFI_Error_Create_Args*) noexcept nogil
        XLA_FFI_Error* (*XLA_FFI_Stream_Get)(XLA_FFI_Stream_Get_Args*) noexcept nogil
        XLA_FFI_Error* (*XLA_FFI_DeviceOrdinal_Get)(XLA_FFI_DeviceOrdinal_Get_Args*) noexcept nogil

    ctypedef struct XLA_FFI_CallFrame:
        XLA_FFI_Extension_Base* extension_start
        XLA_FFI_ExecutionContext* ctx
        const XLA_FFI_Api* api
        XLA_FFI_ExecutionStage stage
        XLA_FFI_Args args
        XLA_FFI_Rets rets
        XLA_FFI_Attrs attrs

    int XLA_FFI_API_MAJOR
    int XLA_FFI_API_MINOR
    size_t XLA_FFI_Api_Version_STRUCT_SIZE
    size_t XLA_FFI_Error_Create_Args_STRUCT_SIZE
    size_t XLA_FFI_Stream_Get_Args_STRUCT_SIZE
    size_t XLA_FFI_DeviceOrdinal_Get_Args_STRUCT_SIZE


cdef enum:
    DTW = 0
    VITERBI = 1
    DAG = 2

# trailing (non-batch) rank of theta per structure
_TRAILING = {DTW: 2, VITERBI: 3, DAG: 1}
_PREFIX = {DTW: "dtw", VITERBI: "viterbi", DAG: "dag"}
# the infinity each structure's scores may not hold (NaN never): as the NumPy API checks
_FORBID = {DTW: "-inf", VITERBI: "+inf", DAG: "+inf"}


_DTYPES = {XLA_FFI_DataType_F32: np.float32, XLA_FFI_DataType_F64: np.float64,
           XLA_FFI_DataType_S32: np.int32, XLA_FFI_DataType_S64: np.int64}


cdef object _array(XLA_FFI_Buffer* buf, object device):
    """A view of an XLA buffer (no copy): NumPy on the host, CuPy on GPU ``device``."""
    cdef int64_t k, count = 1
    dtype = _DTYPES.get(<int> buf.dtype)
    if dtype is None:
        raise TypeError(f"smoothmax XLA handler: unsupported buffer dtype code {<int> buf.dtype}")
    shape = tuple(buf.dims[k] for k in range(buf.rank))
    for k in range(buf.rank):
        count *= buf.dims[k]
    nbytes = count * np.dtype(dtype).itemsize
    if device is not None:
        import cupy

        if count == 0 or buf.data == NULL:
            return cupy.empty(shape, dtype)
        memory = cupy.cuda.UnownedMemory(<size_t> buf.data, nbytes, None, device)
        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))
    if count == 0 or buf.data == NULL:
        return np.empty(shape, dtype)
    view = PyMemoryView_FromMemory(<char*> buf.data, nbytes, PyBUF_WRITE)
    return np.frombuffer(view, dtype).reshape(shape)


cdef dict _attributes(XLA_FFI_CallFrame* frame):
    cdef int64_t k
    cdef XLA_FFI_ByteSpan* name
    cdef XLA_FFI_ByteSpan* text
    cdef XLA_FFI_Scalar* scalar
    cdef XLA_FFI_Array* array
    out = {}
    for k in range(frame.attrs.size):
        name = frame.attrs.names[k]
        key = name.ptr[:name.len].decode()
        if frame.attrs.types[k] == XLA_FFI_AttrType_STRING:
            text = <XLA_FFI_ByteSpan*> frame.attrs.attrs[k]
            out[key] = text.ptr[:text.len].decode()
        elif frame.attrs.types[k] == XLA_FFI_AttrType_SCALAR:
            scalar = <XLA_FFI_Scalar*> frame.attrs.attrs[k]
            if scalar.dtype == XLA_FFI_DataType_F64:
                out[key] = (<double*> scalar.value)[0]
            elif scalar.dtype == XLA_FFI_DataType_S64:
                out[key] = (<int64_t*> scalar.value)[0]
            elif scalar.dtype == XLA_FFI_DataType_S32:
                out[key] = (<int32_t*> scalar.value)[0]
            else:
                raise TypeError(f"smoothmax XLA handler: attribute {key!r} has an unsupported type")
        elif frame.attrs.types[k] == XLA_FFI_AttrType_ARRAY:
            array = <XLA_FFI_Array*> frame.attrs.attrs[k]
            if array.dtype == XLA_FFI_DataType_S64:
                out[key] = np.array(<int64_t[:array.size]> <int64_t*> array.data) if array.size else np.zeros(0, np.int64)
            elif array.dtype == XLA_FFI_DataType_S32:
                out[key] = np.array(<int32_t[:array.size]> <int32_t*> array.data) if array.size else np.zeros(0, np.int32)
            else:
                raise TypeError(f"smoothmax XLA handler: attribute {key!r} has an unsupported type")
        else:
            raise TypeError(f"smoothmax XLA handler: attribute {key!r} has an unsupported kind")
    return out


def _flat(a, lead):
    """``a`` with its ``lead`` leading dimensions folded into the batch."""
    return a.reshape((-1,) + a.shape[lead + 1:]) if lead else a


_PICKS = {"value": (0,), "grad": (0, 1), "hvp": (2,)}


def _execute(int which, list args, list rets, dict attrs, xp=np, engine=None):
    """Run ``attrs["op"]`` on the wrapped buffers ``args``, results into ``rets``.

    ``engine`` None: the compiled core, which writes into ``rets`` itself
    (``out=``). Otherwise a module of engine functions on ``xp`` arrays (the
    GPU engine, ``smoothmax._cuda.engine``) whose results are copied into
    ``rets`` (on the current stream).
    """
    op = attrs["op"]
    theta = args[0]
    lead = theta.ndim - 1 - _TRAILING[which]
    flat = _flat(theta, lead)
    rest = args[1:]
    Z = None
    if op == "hvp":
        Z, rest = _flat(rest[0], lead), rest[1:]
    # the integer arrays: operands, or attributes int0, int1, ... (inside shard_map)
    ints = [xp.ascontiguousarray(xp.asarray(a), dtype=xp.int64)
            for a in list(rest) + [attrs[f"int{k}"] for k in range(len(attrs)) if f"int{k}" in attrs]]
    if which == DTW:
        fixed = (ints[0].reshape(-1), ints[1].reshape(-1), attrs["band"])
    elif which == VITERBI:
        fixed = (ints[0].reshape(-1),)
    else:  # shared operands broadcast over vmapped dimensions: their first copy
        fixed = tuple(a.reshape((-1,) + a.shape[lead:])[0] if lead and a.ndim > 1 else a for a in ints)
    prefix = _PREFIX[which]
    mod = engine if engine is not None else {DTW: _dtw, VITERBI: _viterbi, DAG: _dag}[which]
    fn = getattr(mod, f"{prefix}_{op}", None)
    if fn is None or op not in ("value", "grad", "hvp", "decode", "path"):
        raise ValueError(f"smoothmax XLA handler: no {prefix} op {op!r} in this engine")
    outs = [_flat(r, lead) for r in rets]
    tail = () if op in ("decode", "path") else (attrs["reg"], attrs["gamma"])
    head = (flat,) if Z is None else (flat, Z)
    if engine is None and op in _PICKS:
        # the compiled core writes into XLA's buffers; an HVP's value and E are scratch
        if op == "hvp":
            out = (np.empty(flat.shape[0], flat.dtype), _scratch(flat.shape, flat.dtype), outs[0])
        else:
            out = (outs[0], outs[1] if op == "grad" else None, None)
        fn(*head, *fixed, *tail, out=out)
        # values beyond the dtype's range: rerun rescaled, into the same buffers
        _extremes.rescue_overflow(prefix, op, fn, [*head, *fixed, *tail], out, fixed, into=out)
        return
    # the GPU kernels do not check their input (the compiled core does, inside
    # its pass): the NumPy API's check, on the device, on XLA's stream (a
    # synchronisation; inside jax.jit no Python check sees values)
    _check_values(flat, xp, "theta", _FORBID[which])
    if Z is not None:
        _check_values(Z, xp, "Z", "inf")
    res = fn(*head, *fixed, *tail)
    res = res if isinstance(res, tuple) else (res,)
    res = _extremes.rescue_overflow(prefix, op, fn, [*head, *fixed, *tail], res, fixed)
    picked = [res[k] for k in _PICKS[op]] if op in _PICKS else list(res)
    for dst, src in zip(outs, picked):
        dst[...] = src


cdef XLA_FFI_Error* _error(XLA_FFI_CallFrame* frame, bytes message, XLA_FFI_Error_Code code):
    cdef XLA_FFI_Error_Create_Args args
    args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE
    args.extension_start = NULL
    args.message = message  # copied by XLA
    args.errc = code
    return frame.api.XLA_FFI_Error_Create(&args)


cdef bint _metadata(XLA_FFI_CallFrame* frame) noexcept nogil:
    """Answer XLA's query for the FFI version the handler was built against."""
    cdef XLA_FFI_Metadata* md
    if frame.extension_start == NULL or frame.extension_start.type != XLA_FFI_Extension_Metadata:
        return False
    md = (<XLA_FFI_Metadata_Extension*> frame.extension_start).metadata
    md.api_version.struct_size = XLA_FFI_Api_Version_STRUCT_SIZE
    md.api_version.extension_start = NULL
    md.api_version.major_version = XLA_FFI_API_MAJOR
    md.api_version.minor_version = XLA_FFI_API_MINOR
    md.traits = 0  # not compatible with command buffers (CUDA graphs): it takes the GIL
    md.state_type_id.type_id = 0
    return True


cdef XLA_FFI_Error* _run(XLA_FFI_CallFrame* frame, int which, bint gpu) noexcept with gil:
    cdef int64_t k
    cdef XLA_FFI_Stream_Get_Args stream
    cdef XLA_FFI_DeviceOrdinal_Get_Args ordinal
    cdef XLA_FFI_Error* err
    try:
        attrs = _attributes(frame)
        if not gpu:
            args = [_array(<XLA_FFI_Buffer*> frame.args.args[k], None) for k in range(frame.args.size)]
            rets = [_array(<XLA_FFI_Buffer*> frame.rets.rets[k], None) for k in range(frame.rets.size)]
            _execute(which, args, rets, attrs)
            return NULL
        stream.struct_size = XLA_FFI_Stream_Get_Args_STRUCT_SIZE
        stream.extension_start = NULL
        stream.ctx = frame.ctx
        stream.stream = NULL
        with nogil:
            err = frame.api.XLA_FFI_Stream_Get(&stream)
        if err != NULL:
            return err
        ordinal.struct_size = XLA_FFI_DeviceOrdinal_Get_Args_STRUCT_SIZE
        ordinal.extension_start = NULL
        ordinal.ctx = frame.ctx
        ordinal.device_ordinal = 0
        with nogil:
            err = frame.api.XLA_FFI_DeviceOrdinal_Get(&ordinal)
        if err != NULL:
            return err
        import cupy
        from .._cuda import engine

        device = int(ordinal.device_ordinal)
        with cupy.cuda.Device(device), cupy.cuda.ExternalStream(<size_t> stream.stream, device):
            args = [_array(<XLA_FFI_Buffer*> frame.args.args[k], device) for k in range(frame.args.size)]
            rets = [_array(<XLA_FFI_Buffer*> frame.rets.rets[k], device) for k in range(frame.rets.size)]
            _execute(which, args, rets, attrs, cupy, engine)
        return NULL
    except ValueError as exc:
        return _error(frame, f"ValueError: {exc}".encode(), XLA_FFI_Error_Code_INVALID_ARGUMENT)
    except BaseException as exc:
        return _error(frame, f"{type(exc).__name__}: {exc}".encode(), XLA_FFI_Error_Code_INTERNAL)


cdef XLA_FFI_Error* _handle(XLA_FFI_CallFrame* frame, int which, bint gpu) noexcept nogil:
    if _metadata(frame) or frame.stage != XLA_FFI_ExecutionStage_EXECUTE:
        return NULL
    return _run(frame, which, gpu)


cdef XLA_FFI_Error* _dtw_handler(XLA_FFI_CallFrame* frame) noexcept nogil:
    return _handle(frame, DTW, False)


cdef XLA_FFI_Error* _viterbi_handler(XLA_FFI_CallFrame* frame) noexcept nogil:
    return _handle(frame, VITERBI, False)


cdef XLA_FFI_Error* _dag_handler(XLA_FFI_CallFrame* frame) noexcept nogil:
    return _handle(frame, DAG, False)


cdef XLA_FFI_Error* _dtw_cuda_handler(XLA_FFI_CallFrame* frame) noexcept nogil:
    return _handle(frame, DTW, True)


cdef XLA_FFI_Error* _viterbi_cuda_handler(XLA_FFI_CallFrame* frame) noexcept nogil:
    return _handle(frame, VITERBI, True)


def handlers(platform="cpu"):
    """``{structure: PyCapsule}`` of the XLA FFI handlers (``XLA_FFI_Handler*``) of ``platform``.

    ``"cpu"``: DTW, Viterbi and the DAG on the compiled core. ``"cuda"``: DTW
    and Viterbi on the GPU engine (CuPy, on XLA's stream; there are no DAG
    kernels), for XLA's CUDA platform.
    """
    if platform == "cpu":
        return {
            "dtw": PyCapsule_New(<void*> _dtw_handler, NULL, NULL),
            "viterbi": PyCapsule_New(<void*> _viterbi_handler, NULL, NULL),
            "dag": PyCapsule_New(<void*> _dag_handler, NULL, NULL),
        }
    if platform == "cuda":
        return {
            "dtw": PyCapsule_New(<void*> _dtw_cuda_handler, NULL, NULL),
            "viterbi": PyCapsule_New(<void*> _viterbi_cuda_handler, NULL, NULL),
        }
    raise ValueError(f"platform must be 'cpu' or 'cuda', got {platform!r}")
