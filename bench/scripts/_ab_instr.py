import collections, os, sys, time, atexit, threading
sys.path.insert(0, os.path.dirname(__file__))
import gradyard.telemetry as T
from gradyard.telemetry import comm, timing, progress, exporter, flops, resources
from gradyard.analysis import callback as acb
from gradyard import trainer as tr
acc = collections.Counter(); cnt = collections.Counter()
def wrap(cls, meth):
    f = getattr(cls, meth)
    def w(self, *a, **k):
        t = time.perf_counter()
        try: return f(self, *a, **k)
        finally:
            acc[f"{cls.__name__}.{meth}"] += time.perf_counter() - t; cnt[f"{cls.__name__}.{meth}"] += 1
    setattr(cls, meth, w)
for cls in (comm.GradSyncMonitor, timing.StepTimer, progress.ProgressMonitor, exporter.PrometheusExporter,
            flops.FlopsMonitor, resources.ResourceMonitor, acb.CensusCallback):
    wrap(cls, "on_event")
# fire() total per trainer
orig_fire = tr.Trainer.fire
def fire(self, event):
    t = time.perf_counter()
    try: return orig_fire(self, event)
    finally:
        acc[f"fire[{self.state.spec.telemetry.enabled}]"] += time.perf_counter() - t
tr.Trainer.fire = fire
def report():
    if os.environ.get("RANK") == "0":
        print("INSTR cpu process/thread on/off:", cpu, "ratios", cpu["on"][0]/cpu["off"][0], cpu["on"][1]/cpu["off"][1], flush=True)
        for k in sorted(acc): print(f"INSTR {k}: {acc[k]*1e6/600:.1f} us/step (calls {cnt[k]})", flush=True)
import telemetry_ab
cpu = {"on": [0.0, 0.0], "off": [0.0, 0.0]}; st = {}
ow, op = telemetry_ab.Baton.wait, telemetry_ab.Baton.pass_on
def bw(self, arm):
    ow(self, arm); st[arm] = (time.process_time(), time.thread_time())
def bp(self, arm, record, done=False):
    if record:
        cpu[arm][0] += time.process_time() - st[arm][0]; cpu[arm][1] += time.thread_time() - st[arm][1]
    op(self, arm, record, done)
telemetry_ab.Baton.wait, telemetry_ab.Baton.pass_on = bw, bp
_oh = comm.GradSyncMonitor._hook
def _hook(self, process_group, bucket):
    t = time.perf_counter()
    try: return _oh(self, process_group, bucket)
    finally:
        acc["hook"] += time.perf_counter() - t; cnt["hook"] += 1
comm.GradSyncMonitor._hook = _hook
rc = telemetry_ab.main()
report()
sys.exit(rc)
