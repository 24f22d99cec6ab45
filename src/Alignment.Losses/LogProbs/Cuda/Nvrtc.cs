using System.Runtime.InteropServices;
using System.Text;

namespace Alignment.Losses.Internal.Cuda;

/// <summary>NVRTC, loaded at run time from the first candidate that loads: compiles CUDA C to PTX (needs no GPU).</summary>
internal sealed unsafe class Nvrtc
{
    private readonly delegate* unmanaged<IntPtr*, byte*, byte*, int, IntPtr, IntPtr, int> _create;
    private readonly delegate* unmanaged<IntPtr, int, byte**, int> _compile;
    private readonly delegate* unmanaged<IntPtr, nuint*, int> _logSize;
    private readonly delegate* unmanaged<IntPtr, byte*, int> _log;
    private readonly delegate* unmanaged<IntPtr, nuint*, int> _ptxSize;
    private readonly delegate* unmanaged<IntPtr, byte*, int> _ptx;
    private readonly delegate* unmanaged<IntPtr*, int> _destroy;
    private readonly delegate* unmanaged<int*, int*, int> _version;

    private Nvrtc(IntPtr library, string path)
    {
        Path = path;
        _create = (delegate* unmanaged<IntPtr*, byte*, byte*, int, IntPtr, IntPtr, int>)NativeLibrary.GetExport(library, "nvrtcCreateProgram");
        _compile = (delegate* unmanaged<IntPtr, int, byte**, int>)NativeLibrary.GetExport(library, "nvrtcCompileProgram");
        _logSize = (delegate* unmanaged<IntPtr, nuint*, int>)NativeLibrary.GetExport(library, "nvrtcGetProgramLogSize");
        _log = (delegate* unmanaged<IntPtr, byte*, int>)NativeLibrary.GetExport(library, "nvrtcGetProgramLog");
        _ptxSize = (delegate* unmanaged<IntPtr, nuint*, int>)NativeLibrary.GetExport(library, "nvrtcGetPTXSize");
        _ptx = (delegate* unmanaged<IntPtr, byte*, int>)NativeLibrary.GetExport(library, "nvrtcGetPTX");
        _destroy = (delegate* unmanaged<IntPtr*, int>)NativeLibrary.GetExport(library, "nvrtcDestroyProgram");
        _version = (delegate* unmanaged<int*, int*, int>)NativeLibrary.GetExport(library, "nvrtcVersion");
    }

    /// <summary>The file (or loader name) NVRTC was loaded from.</summary>
    internal string Path { get; }

    /// <summary>NVRTC's version, e.g. (12, 8).</summary>
    internal (int Major, int Minor) Version
    {
        get
        {
            int major, minor;
            Check(_version(&major, &minor), "nvrtcVersion");
            return (major, minor);
        }
    }

    /// <summary>Loads NVRTC from the first candidate that loads and exports the API; otherwise null and the reasons.</summary>
    internal static Nvrtc? TryLoad(IEnumerable<string> candidates, out string failure)
    {
        var tried = new List<string>();
        foreach (var candidate in candidates)
        {
            PreloadBuiltins(candidate);
            if (!NativeLibrary.TryLoad(candidate, out var handle))
            {
                tried.Add(candidate);
                continue;
            }
            try
            {
                failure = "";
                return new Nvrtc(handle, candidate);
            }
            catch (EntryPointNotFoundException e)
            {
                tried.Add($"{candidate} ({e.Message})");
            }
        }
        failure = "libnvrtc was not found (tried: " + string.Join(", ", tried) + "). Set " + NvrtcLocator.OverrideVariable +
                  " to its path, or install the CUDA toolkit's NVRTC (pip: nvidia-cuda-nvrtc-cu12).";
        return null;
    }

    /// <summary>
    /// NVRTC dlopens its builtins library by soname at compile time; when NVRTC lives in a folder the loader does not search,
    /// loading the builtins beside it by full path first lets that lookup find the copy already in the process.
    /// </summary>
    private static void PreloadBuiltins(string candidate)
    {
        var dir = System.IO.Path.GetDirectoryName(candidate);
        if (string.IsNullOrEmpty(dir) || !Directory.Exists(dir)) return;
        foreach (var builtins in Directory.EnumerateFiles(dir, "libnvrtc-builtins*.so*").OrderByDescending(f => f, StringComparer.Ordinal))
            if (NativeLibrary.TryLoad(builtins, out _)) return;
    }

    /// <summary>Compiles <paramref name="source"/> to PTX; throws with NVRTC's log on failure.</summary>
    internal string CompileToPtx(string source, string name, IReadOnlyList<string> options)
    {
        var sourceBytes = Encoding.UTF8.GetBytes(source + "\0");
        var nameBytes = Encoding.UTF8.GetBytes(name + "\0");
        var optionBytes = options.Select(o => Encoding.UTF8.GetBytes(o + "\0")).ToArray();
        var handles = optionBytes.Select(b => GCHandle.Alloc(b, GCHandleType.Pinned)).ToArray();
        IntPtr program = IntPtr.Zero;
        try
        {
            fixed (byte* src = sourceBytes)
            fixed (byte* n = nameBytes)
                Check(_create(&program, src, n, 0, IntPtr.Zero, IntPtr.Zero), "nvrtcCreateProgram");
            var pointers = handles.Select(h => (IntPtr)h.AddrOfPinnedObject()).ToArray();
            int status;
            fixed (IntPtr* opts = pointers)
                status = _compile(program, pointers.Length, (byte**)opts);
            if (status != 0)
                throw new InvalidOperationException($"NVRTC ({Path}) could not compile the log-prob kernels (status {status}):\n{Log(program)}");
            nuint size;
            Check(_ptxSize(program, &size), "nvrtcGetPTXSize");
            var ptx = new byte[(int)size];
            fixed (byte* p = ptx) Check(_ptx(program, p), "nvrtcGetPTX");
            return Encoding.UTF8.GetString(ptx, 0, Math.Max(0, ptx.Length - 1));
        }
        finally
        {
            if (program != IntPtr.Zero) _destroy(&program);
            foreach (var h in handles) h.Free();
        }
    }

    private string Log(IntPtr program)
    {
        nuint size;
        if (_logSize(program, &size) != 0 || size == 0) return "(no log)";
        var log = new byte[(int)size];
        fixed (byte* p = log) _log(program, p);
        return Encoding.UTF8.GetString(log).TrimEnd('\0');
    }

    private static void Check(int status, string what)
    {
        if (status != 0) throw new InvalidOperationException($"{what} failed with NVRTC status {status}.");
    }
}
