using System.Diagnostics;
using System.Reflection;
using Xunit.Abstractions;
using Xunit.Sdk;

// Usage: dotnet Alignment.Losses.TestRunner.dll [--class Full.Class.Name ...] [--method-contains TEXT] [--list]
// Discovers the tests of Alignment.Losses.Tests with xunit's own discoverer (theories, member data, skip reasons as
// `dotnet test` sees them), keeps the named classes, runs them one after another in this process and prints one line
// per test and a closing "N passed, N failed, N skipped". Exit code: 0 when nothing failed and something ran.
var classes = new List<string>();
string? methodFilter = null;
bool list = false;
for (int i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--class" when i + 1 < args.Length: classes.Add(args[++i]); break;
        case "--method-contains" when i + 1 < args.Length: methodFilter = args[++i]; break;
        case "--list": list = true; break;
        default:
            Console.Error.WriteLine($"unknown argument '{args[i]}'. Usage: --class Full.Class.Name ... [--method-contains TEXT] [--list]");
            return 2;
    }
}

var assembly = typeof(Alignment.Losses.Tests.CudaTests).Assembly;
var diagnostics = new Alignment.Losses.TestRunner.Sink();
using var framework = new XunitTestFramework(diagnostics);
var discoverer = framework.GetDiscoverer(Reflector.Wrap(assembly));
var found = new Alignment.Losses.TestRunner.Sink();
discoverer.Find(includeSourceInformation: false, found, new Alignment.Losses.TestRunner.Options());
found.Done.WaitOne();

var unknown = classes.Where(c => !found.TestCases.Any(t => t.TestMethod.TestClass.Class.Name == c)).ToList();
if (unknown.Count > 0)
{
    Console.Error.WriteLine($"no tests in class(es) {string.Join(", ", unknown)} of {assembly.GetName().Name}");
    return 2;
}
var chosen = found.TestCases
    .Where(t => classes.Count == 0 || classes.Contains(t.TestMethod.TestClass.Class.Name))
    .Where(t => methodFilter is null || t.TestMethod.Method.Name.Contains(methodFilter, StringComparison.Ordinal))
    .ToList();
if (list)
{
    foreach (var t in chosen) Console.WriteLine(t.DisplayName);
    return 0;
}

Console.WriteLine($"running {chosen.Count} test case(s) of {assembly.GetName().Name}");
var clock = Stopwatch.StartNew();
var run = new Alignment.Losses.TestRunner.Sink { Echo = true };
using var executor = framework.GetExecutor(assembly.GetName());
executor.RunTests(chosen, run, new Alignment.Losses.TestRunner.Options { ["xunit.execution.DisableParallelization"] = true });
run.Done.WaitOne();
Console.WriteLine($"{run.Passed} passed, {run.Failed} failed, {run.Skipped} skipped ({clock.Elapsed.TotalSeconds:F1} s)");
return run.Failed == 0 && run.Passed + run.Skipped > 0 ? 0 : 1;

namespace Alignment.Losses.TestRunner
{
    /// <summary>Collects discovery and execution messages; with <see cref="Echo"/>, prints one line per test result.</summary>
    internal sealed class Sink : IMessageSink
    {
        public ManualResetEvent Done { get; } = new(false);
        public List<ITestCase> TestCases { get; } = new();
        public bool Echo { get; init; }
        public int Passed, Failed, Skipped;

        public bool OnMessage(IMessageSinkMessage message)
        {
            switch (message)
            {
                case ITestCaseDiscoveryMessage d: TestCases.Add(d.TestCase); break;
                case IDiscoveryCompleteMessage: Done.Set(); break;
                case ITestPassed p:
                    Passed++;
                    if (Echo) Console.WriteLine($"PASS {p.Test.DisplayName} ({p.ExecutionTime:F2} s)");
                    break;
                case ITestSkipped s:
                    Skipped++;
                    if (Echo) Console.WriteLine($"SKIP {s.Test.DisplayName}: {s.Reason}");
                    break;
                case ITestFailed f:
                    Failed++;
                    if (Echo)
                        Console.WriteLine($"FAIL {f.Test.DisplayName} ({f.ExecutionTime:F2} s)\n  " +
                                          string.Join("\n  ", f.ExceptionTypes.Zip(f.Messages, (t, m) => $"{t}: {m}")) + "\n  " +
                                          string.Join("\n  ", f.StackTraces.Where(s => s is not null)).Replace("\n", "\n  ", StringComparison.Ordinal));
                    break;
                case IErrorMessage e:
                    Failed++;
                    Console.WriteLine("ERROR " + string.Join("\n  ", e.ExceptionTypes.Zip(e.Messages, (t, m) => $"{t}: {m}")));
                    break;
                case ITestAssemblyFinished: Done.Set(); break;
            }
            return true;
        }
    }

    /// <summary>xunit's discovery and execution options: a plain name/value bag.</summary>
    internal sealed class Options : ITestFrameworkDiscoveryOptions, ITestFrameworkExecutionOptions
    {
        private readonly Dictionary<string, object?> _values = new();

        public object? this[string name] { set => _values[name] = value; }

        public TValue GetValue<TValue>(string name) => _values.TryGetValue(name, out var v) && v is TValue t ? t : default!;

        public void SetValue<TValue>(string name, TValue value) => _values[name] = value;
    }
}
