using System.Runtime.InteropServices;
using System.Text;

namespace Alignment.Losses.Internal.Cuda;

/// <summary>The few CUDA driver API calls the fused kernels need, from libcuda loaded at run time.</summary>
/// <remarks>Kernels run in the device's primary context (the one libtorch uses) on the legacy default stream, which is
/// libtorch's default stream, so they are ordered with the surrounding TorchSharp work.</remarks>
internal sealed unsafe class CudaDriver
{
    private const int ComputeCapabilityMajor = 75, ComputeCapabilityMinor = 76;   // CU_DEVICE_ATTRIBUTE_*

    private readonly delegate* unmanaged<uint, int> _init;
    private readonly delegate* unmanaged<int*, int, int> _deviceGet;
    private readonly delegate* unmanaged<int*, int, int, int> _attribute;
    private readonly delegate* unmanaged<IntPtr*, int, int> _primaryCtxRetain;
    private readonly delegate* unmanaged<IntPtr, int> _ctxSetCurrent;
    private readonly delegate* unmanaged<IntPtr*, byte*, int> _moduleLoadData;
    private readonly delegate* unmanaged<IntPtr*, IntPtr, byte*, int> _moduleGetFunction;
    private readonly delegate* unmanaged<IntPtr, uint, uint, uint, uint, uint, uint, uint, IntPtr, IntPtr*, IntPtr*, int> _launch;
    private readonly delegate* unmanaged<int, IntPtr*, int> _errorString;
    private readonly delegate* unmanaged<nuint*, nuint*, int> _memGetInfo;

    private CudaDriver(IntPtr lib)
    {
        _init = (delegate* unmanaged<uint, int>)NativeLibrary.GetExport(lib, "cuInit");
        _deviceGet = (delegate* unmanaged<int*, int, int>)NativeLibrary.GetExport(lib, "cuDeviceGet");
        _attribute = (delegate* unmanaged<int*, int, int, int>)NativeLibrary.GetExport(lib, "cuDeviceGetAttribute");
        _primaryCtxRetain = (delegate* unmanaged<IntPtr*, int, int>)NativeLibrary.GetExport(lib, "cuDevicePrimaryCtxRetain");
        _ctxSetCurrent = (delegate* unmanaged<IntPtr, int>)NativeLibrary.GetExport(lib, "cuCtxSetCurrent");
        _moduleLoadData = (delegate* unmanaged<IntPtr*, byte*, int>)NativeLibrary.GetExport(lib, "cuModuleLoadData");
        _moduleGetFunction = (delegate* unmanaged<IntPtr*, IntPtr, byte*, int>)NativeLibrary.GetExport(lib, "cuModuleGetFunction");
        _launch = (delegate* unmanaged<IntPtr, uint, uint, uint, uint, uint, uint, uint, IntPtr, IntPtr*, IntPtr*, int>)NativeLibrary.GetExport(lib, "cuLaunchKernel");
        _errorString = (delegate* unmanaged<int, IntPtr*, int>)NativeLibrary.GetExport(lib, "cuGetErrorString");
        _memGetInfo = (delegate* unmanaged<nuint*, nuint*, int>)NativeLibrary.GetExport(lib, "cuMemGetInfo_v2");
    }

    internal static CudaDriver? TryLoad(out string failure)
    {
        foreach (var name in new[] { "libcuda.so.1", "libcuda.so", "nvcuda.dll" })
        {
            if (!NativeLibrary.TryLoad(name, out var lib)) continue;
            var driver = new CudaDriver(lib);
            int status = driver._init(0);
            if (status == 0) { failure = ""; return driver; }
            failure = $"cuInit failed: {driver.Error(status)}";
            return null;
        }
        failure = "the CUDA driver library (libcuda.so.1) was not found";
        return null;
    }

    private readonly Dictionary<int, (IntPtr Context, int Major, int Minor)> _devices = new();

    /// <summary>
    /// Makes the device's primary context current on this thread (each launch: CUDA autograd runs backward on a worker
    /// thread) and returns its compute capability. The primary context is retained once per device.
    /// </summary>
    internal (int Major, int Minor) UseDevice(int ordinal)
    {
        (IntPtr Context, int Major, int Minor) entry;
        lock (_devices)
        {
            if (!_devices.TryGetValue(ordinal, out entry))
            {
                int device, major, minor;
                IntPtr context;
                Check(_deviceGet(&device, ordinal), "cuDeviceGet");
                Check(_primaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain");
                Check(_attribute(&major, ComputeCapabilityMajor, device), "cuDeviceGetAttribute");
                Check(_attribute(&minor, ComputeCapabilityMinor, device), "cuDeviceGetAttribute");
                _devices[ordinal] = entry = (context, major, minor);
            }
        }
        Check(_ctxSetCurrent(entry.Context), "cuCtxSetCurrent");
        return (entry.Major, entry.Minor);
    }

    /// <summary>
    /// Free and total bytes of the device (cuMemGetInfo). libtorch's caching allocator keeps what it reserved, so the
    /// drop in free memory across a call is the call's peak reserved growth: the GPU benchmark script's peak-memory figure
    /// (TorchSharp 0.107 exposes no CUDA memory statistics).
    /// </summary>
    internal (long Free, long Total) MemoryInfo(int ordinal)
    {
        UseDevice(ordinal);
        nuint free, total;
        Check(_memGetInfo(&free, &total), "cuMemGetInfo");
        return ((long)free, (long)total);
    }

    internal IntPtr LoadModule(string ptx)
    {
        var bytes = Encoding.UTF8.GetBytes(ptx + "\0");
        IntPtr module;
        fixed (byte* p = bytes) Check(_moduleLoadData(&module, p), "cuModuleLoadData");
        return module;
    }

    internal IntPtr GetFunction(IntPtr module, string name)
    {
        var bytes = Encoding.UTF8.GetBytes(name + "\0");
        IntPtr function;
        fixed (byte* p = bytes) Check(_moduleGetFunction(&function, module, p), "cuModuleGetFunction(" + name + ")");
        return function;
    }

    /// <summary>Launches <paramref name="function"/> with one block per row on the legacy default stream.</summary>
    internal void Launch(IntPtr function, long rows, int blockSize, params object[] arguments)
    {
        var boxes = new GCHandle[arguments.Length];
        var pointers = new IntPtr[arguments.Length];
        try
        {
            for (int i = 0; i < arguments.Length; i++)
            {
                object value = arguments[i] switch { IntPtr p => p.ToInt64(), long l => l, _ => throw new ArgumentException("kernel arguments are pointers or int64") };
                var cell = new long[] { (long)value };
                boxes[i] = GCHandle.Alloc(cell, GCHandleType.Pinned);
                pointers[i] = boxes[i].AddrOfPinnedObject();
            }
            fixed (IntPtr* args = pointers)
                Check(_launch(function, checked((uint)rows), 1, 1, (uint)blockSize, 1, 1, 0, IntPtr.Zero, args, null), "cuLaunchKernel");
        }
        finally
        {
            foreach (var b in boxes) if (b.IsAllocated) b.Free();
        }
    }

    private string Error(int status)
    {
        IntPtr text;
        return _errorString(status, &text) == 0 && text != IntPtr.Zero ? $"{Marshal.PtrToStringAnsi(text)} ({status})" : $"CUDA error {status}";
    }

    private void Check(int status, string what)
    {
        if (status != 0) throw new InvalidOperationException($"{what} failed: {Error(status)}");
    }
}
