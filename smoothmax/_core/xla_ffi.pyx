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

The handler never imports a framework; ``smoothmax.jax`` registers the
capsules of ``handlers()`` with ``jax.ffi.register_ffi_target``.
"""
from cpython.buffer cimport PyBUF_WRITE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.pycapsule cimport PyCapsule_New
from libc.stdint cimport int32_t, int64_t, uint32_t

import numpy as np

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

    ctypedef struct XLA_FFI_Api:
        XLA_FFI_Error* (*XLA_FFI_Error_Create)(XLA_FFI_Error_Create_Args*)

    ctypedef struct XLA_FFI_CallFrame:
        XLA_FFI_Extension_Base* extension_start
        const XLA_FFI_Api* api
        XLA_FFI_ExecutionStage stage
        XLA_FFI_Args args
        XLA_FFI_Rets rets
        XLA_FFI_Attrs attrs

    int XLA_FFI_API_MAJOR
    int XLA_FFI_API_MINOR
    size_t XLA_FFI_Api_Version_STRUCT_SIZE
    size_t XLA_FFI_Error_Create_Args_STRUCT_SIZE


cdef enum:
    DTW = 0
    VITERBI = 1
    DAG = 2

# trailing (non-batch) rank of theta per structure
_TRAILING = {DTW: 2, VITERBI: 3, DAG: 1}


cdef object _array(XLA_FFI_Buffer* buf):
    """A NumPy view of an XLA buffer (no copy)."""
    cdef int64_t k, count = 1
    if buf.dtype == XLA_FFI_DataType_F32:
        dtype = np.float32
    elif buf.dtype == XLA_FFI_DataType_F64:
        dtype = np.float64
    elif buf.dtype == XLA_FFI_DataType_S32:
        dtype = np.int32
    elif buf.dtype == XLA_FFI_DataType_S64:
        dtype = np.int64
    else:
        raise TypeError(f"smoothmax XLA handler: unsupported buffer dtype code {<int> buf.dtype}")
    shape = tuple(buf.dims[k] for k in range(buf.rank))
    for k in range(buf.rank):
        count *= buf.dims[k]
    if count == 0 or buf.data == NULL:
        return np.empty(shape, dtype)
    itemsize = np.dtype(dtype).itemsize
    view = PyMemoryView_FromMemory(<char*> buf.data, count * itemsize, PyBUF_WRITE)
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


def _items(a):
    return np.ascontiguousarray(a.reshape(-1), dtype=np.int64)


def _shared(a, lead):
    """A shared operand broadcast over vmapped dimensions: its first copy."""
    return np.ascontiguousarray(a.reshape((-1,) + a.shape[lead:])[0] if lead else a, dtype=np.int64)


def _execute(int which, list args, list rets, dict attrs):
    op = attrs["op"]
    theta = args[0]
    lead = theta.ndim - 1 - _TRAILING[which]
    flat = _flat(theta, lead)
    rest = args[1:]
    Z = None
    if op == "hvp":
        Z, rest = _flat(rest[0], lead), rest[1:]
    # the integer arrays: operands, or attributes int0, int1, ... (inside shard_map)
    rest = list(rest) + [attrs[f"int{k}"] for k in range(len(attrs)) if f"int{k}" in attrs]
    reg, gamma = attrs["reg"], attrs["gamma"]
    if which == DTW:
        fixed = (_items(rest[0]), _items(rest[1]), attrs["band"])
        mod, prefix = _dtw, "dtw"
    elif which == VITERBI:
        fixed = (_items(rest[0]),)
        mod, prefix = _viterbi, "viterbi"
    else:
        fixed = (_shared(rest[0], lead), _shared(rest[1], lead))
        mod, prefix = _dag, "dag"
    outs = [_flat(r, lead) for r in rets]
    if op in ("decode", "path"):
        res = getattr(mod, f"{prefix}_{op}")(flat, *fixed)
        for dst, src in zip(outs, res):
            dst[...] = src
    elif op == "value":
        getattr(mod, f"{prefix}_value")(flat, *fixed, reg, gamma, out=(outs[0], None, None))
    elif op == "grad":
        getattr(mod, f"{prefix}_grad")(flat, *fixed, reg, gamma, out=(outs[0], outs[1], None))
    elif op == "hvp":
        B = flat.shape[0]
        mod_out = (np.empty(B, flat.dtype), np.empty(flat.shape, flat.dtype), outs[0])
        getattr(mod, f"{prefix}_hvp")(flat, Z, *fixed, reg, gamma, out=mod_out)
    else:
        raise ValueError(f"smoothmax XLA handler: unknown op {op!r}")


cdef XLA_FFI_Error* _error(XLA_FFI_CallFrame* frame, bytes message, XLA_FFI_Error_Code code):
    cdef XLA_FFI_Error_Create_Args args
    args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE
    args.extension_start = NULL
    args.message = message  # copied by XLA
    args.errc = code
    return frame.api.XLA_FFI_Error_Create(&args)


cdef XLA_FFI_Error* _handle(XLA_FFI_CallFrame* frame, int which) noexcept nogil:
    cdef XLA_FFI_Metadata* md
    cdef int64_t k
    if frame.extension_start != NULL and frame.extension_start.type == XLA_FFI_Extension_Metadata:
        # XLA asks which FFI version the handler was built against
        md = (<XLA_FFI_Metadata_Extension*> frame.extension_start).metadata
        md.api_version.struct_size = XLA_FFI_Api_Version_STRUCT_SIZE
        md.api_version.extension_start = NULL
        md.api_version.major_version = XLA_FFI_API_MAJOR
        md.api_version.minor_version = XLA_FFI_API_MINOR
        md.traits = 0
        md.state_type_id.type_id = 0
        return NULL
    if frame.stage != XLA_FFI_ExecutionStage_EXECUTE:
        return NULL
    with gil:
        try:
            args = [_array(<XLA_FFI_Buffer*> frame.args.args[k]) for k in range(frame.args.size)]
            rets = [_array(<XLA_FFI_Buffer*> frame.rets.rets[k]) for k in range(frame.rets.size)]
            _execute(which, args, rets, _attributes(frame))
        except ValueError as exc:
            return _error(frame, f"ValueError: {exc}".encode(), XLA_FFI_Error_Code_INVALID_ARGUMENT)
        except BaseException as exc:
            return _error(frame, f"{type(exc).__name__}: {exc}".encode(), XLA_FFI_Error_Code_INTERNAL)
    return NULL


cdef XLA_FFI_Error* _dtw_handler(XLA_FFI_CallFrame* frame) noexcept nogil:
    return _handle(frame, DTW)


cdef XLA_FFI_Error* _viterbi_handler(XLA_FFI_CallFrame* frame) noexcept nogil:
    return _handle(frame, VITERBI)


cdef XLA_FFI_Error* _dag_handler(XLA_FFI_CallFrame* frame) noexcept nogil:
    return _handle(frame, DAG)


def handlers():
    """``{structure: PyCapsule}`` of the XLA FFI handlers (``XLA_FFI_Handler*``)."""
    return {
        "dtw": PyCapsule_New(<void*> _dtw_handler, NULL, NULL),
        "viterbi": PyCapsule_New(<void*> _viterbi_handler, NULL, NULL),
        "dag": PyCapsule_New(<void*> _dag_handler, NULL, NULL),
    }
