"""`understudy demo grid-risk`: the product's loop in one command, measured, with a report.

    understudy demo grid-risk [--minutes 40] [--out DIR] [--model smollm2-135m | tiny | FOLDER] [--users 2]

Phases, each with a share of the budget (`SHARES`; the machine's speed decides how many steps fit):

  a. a fresh registry in OUT/registry holding the starting pair (the base model + the generic drafter: the one
     `make serve` trained into the user's registry, else `--generic-drafter`, else one trained now as `make
     serve` would); `understudy serve` following `latest` in it
  b. Locust (streaming chat users, real) on held-out grid-risk prompts from now until the training ends; one
     JSON line per request (TTFT, TPOT, drafter version) in OUT/load/events-run.jsonl
  c. + d. `understudy sft` on the task's worked solutions (until `sft_end`, so a reused generic drafter's share
     goes to SFT; never less than its own `sft` share): greedy held-out accuracy of the base model before the
     first step (the baseline), and after; the SFT policy is published with its own drafter (trained by `understudy
     drafter train`'s recipe on the SFT policy's answers: `demo adapt-drafter`), which moves `latest`
  e. `understudy train` (GRPO + TLT), one step per invocation (`--resume`), each publishing a (policy, drafter)
     pair, until the training share of the budget is spent
  f. speculation on vs off on the final pair, on the server that served the run: Locust on the same prompts in
     alternating windows (on, off, on, off), K pinned at 0 for the off ones through the admin API
  g. `understudy drafter eval` of the drafters (co-trained, the SFT policy's, generic) on the held-out prompts
  h. every child stopped (also on Ctrl-C, SIGTERM or a failing phase), then OUT/summary.json and OUT/report.md
     with its plots (understudy/cli/demo_report.py)

The held-out prompts are problems of the task drawn with a seed no training stream uses, and checked: none of them
is among the first `HELDOUT_CHECK` problems of the SFT or GRPO training streams, among the accuracy problems, or
in the shipped prompt files. The accuracy problems are the GRPO trainer's held-out set; `understudy sft` is given
the seed that makes its own held-out set the same problems, so the accuracy before, after SFT and after every
GRPO step is measured on one set, greedily, with the same response budget.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import secrets
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from understudy.cli.demo_procs import (
    LOCUSTFILE,
    ROOT,
    Children,
    DemoError,
    LoadDriver,
    SwapPoller,
    leftover_processes,
    run_locust_once,
    write_json,
)
from understudy.errors import UserError

TASK = "grid-risk"
K = 4  # the server's largest draft length (ServerSettings.num_speculative_tokens) and the evaluated L(K)
SPEC_WINDOWS = 2  # on/off pairs of Locust windows in the speculation phase (on, off, on, off)
MAX_NEW_TOKENS = 160  # response budget of the accuracy evaluations (also given to `understudy sft`) and rollouts
# the seeds: GRPOTrainer draws its held-out problems from Random(seed + 10_007), pretrain() from Random(seed +
# 7_919); `understudy sft --seed seed + SFT_SEED_OFFSET` therefore evaluates on the trainer's held-out problems
GRPO_EVAL_OFFSET, SFT_EVAL_OFFSET = 10_007, 7_919
SFT_SEED_OFFSET = GRPO_EVAL_OFFSET - SFT_EVAL_OFFSET
HELDOUT_OFFSET = 90_001  # the served prompts' stream
HELDOUT_CHECK = 20_000  # problems of each training stream checked against the held-out prompts

# shares of the budget: durations, or for the *_end keys the time since the start at which the phase ends
SHARES = {"generic_drafter": 0.15, "sft": 0.30, "adapt": 0.12, "train_end": 0.78, "spec_each": 0.05, "evals_end": 0.98}
SHARES["sft_end"] = SHARES["generic_drafter"] + SHARES["sft"]  # SFT may also use a reused generic drafter's share

demo_app = typer.Typer(no_args_is_help=True, help="End-to-end demos: the whole loop in one command, with a report.")


@dataclass(frozen=True)
class Profile:
    """Sizes for a model class: `full` for SmolLM2-size models, `tiny` for test-size ones (hidden size <= 256)."""

    name: str
    locust_max_tokens: int  # per served request
    heldout_prompts: int  # served (and drafter-evaluated) held-out prompts
    sft_lr: float
    sft_batch: int
    grpo_prompts: int  # prompts per GRPO step
    grpo_group: int  # samples per prompt
    grpo_lr: float
    drafter_lr: float
    generic_tokens: int  # response length of `drafter train` data (when the generic drafter is trained here)
    drafter_eval_prompts: int
    drafter_eval_tokens: int
    min_load_s: float  # shortest Locust run


PROFILES = {
    "full": Profile("full", locust_max_tokens=96, heldout_prompts=48, sft_lr=3e-4, sft_batch=8, grpo_prompts=4,
                    grpo_group=4, grpo_lr=1e-6, drafter_lr=3e-4, generic_tokens=128, drafter_eval_prompts=16,
                    drafter_eval_tokens=96, min_load_s=30.0),
    "tiny": Profile("tiny", locust_max_tokens=32, heldout_prompts=16, sft_lr=1e-3, sft_batch=8, grpo_prompts=2,
                    grpo_group=4, grpo_lr=1e-4, drafter_lr=1e-3, generic_tokens=48, drafter_eval_prompts=8,
                    drafter_eval_tokens=32, min_load_s=10.0),
}


@dataclass
class Plan:
    model: str  # as given (a preset, a folder, or "tiny")
    out: Path
    minutes: float
    users: int
    seed: int
    profile: Profile
    eval_problems: int
    generic_drafter: str | None

    @property
    def budget_s(self) -> float:
        return self.minutes * 60.0

    def share_s(self, key: str) -> float:
        return SHARES[key] * self.budget_s

    def sft_seconds(self, elapsed_s: float) -> float:
        """SFT runs until `sft_end`, and never for less than its own share. When the generic drafter is reused
        (none trained here), SFT gets that share too: the accuracy needs SFT steps more than the run needs
        anything else (docs/trainer-tasks.md)."""
        return max(self.share_s("sft"), self.share_s("sft_end") - elapsed_s)

    @property
    def sft_seed(self) -> int:
        return self.seed + SFT_SEED_OFFSET


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", "understudy.cli.main", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the machine --------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    mem = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    versions = {}
    for pkg in ("torch", "locust"):
        with contextlib.suppress(Exception):
            versions[pkg] = importlib.metadata.version(pkg)
    return {"cpu_model": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "memory_gib": mem, "platform": platform.platform(), "python": platform.python_version(),
            "packages": versions, "load_average_start": [round(x, 2) for x in os.getloadavg()]}


# ---- prompts ----------------------------------------------------------------------------------------------------
def make_prompt_files(plan: Plan, folder: Path) -> dict[str, Any]:
    """The held-out prompts (served and drafter-evaluated), checked against the training streams, and the prompts
    the SFT drafter adapts on. Returns what the report states about them."""
    from understudy.engine.text import default_prompt_files, load_prompts
    from understudy.trainer.tasks import get_task

    task = get_task(TASK)
    seen: set[str] = set()
    for s in (plan.sft_seed, plan.seed):  # the SFT and GRPO training streams
        rng = random.Random(s)
        seen.update(task.sample(rng).prompt for _ in range(HELDOUT_CHECK))
    eval_rng, sft_eval_rng = random.Random(plan.seed + GRPO_EVAL_OFFSET), random.Random(plan.sft_seed + SFT_EVAL_OFFSET)
    accuracy_set = [task.sample(eval_rng).prompt for _ in range(plan.eval_problems)]
    if accuracy_set != [task.sample(sft_eval_rng).prompt for _ in range(plan.eval_problems)]:
        raise DemoError("the SFT and GRPO held-out problem sets differ: the seed offsets in understudy/cli/demo.py "
                        "no longer match understudy/trainer/pretrain.py and grpo.py; update GRPO_EVAL_OFFSET and "
                        "SFT_EVAL_OFFSET")
    accuracy_in_training = sum(p in seen for p in accuracy_set)
    seen.update(accuracy_set)
    shipped = {r["prompt"] for f in default_prompt_files() for r in load_prompts(f)}
    rng, rows, rejected = random.Random(plan.seed + HELDOUT_OFFSET), [], 0
    while len(rows) < plan.profile.heldout_prompts:
        p = task.sample(rng)
        if p.prompt in seen or p.prompt in shipped:
            rejected += 1
            continue
        seen.add(p.prompt)
        rows.append({"prompt": p.prompt, "answer": p.answer, "category": "grid-n1", "split": "heldout"})
    folder.mkdir(parents=True, exist_ok=True)
    heldout = folder / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_rng = random.Random(plan.sft_seed)  # the SFT training stream's own problems
    # more than the drafter's data budget answers: the budget, not the list, ends the data (warmup.py)
    adapt = [{"prompt": task.sample(train_rng).prompt, "category": "grid-n1", "split": "train"} for _ in range(400)]
    (folder / "adapt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in adapt + rows[:8]))
    return {"file": str(heldout), "count": len(rows), "seed": plan.seed + HELDOUT_OFFSET,
            "checked_against": {"sft_training_problems": HELDOUT_CHECK, "grpo_training_problems": HELDOUT_CHECK,
                                "accuracy_problems": plan.eval_problems, "shipped_prompt_files": len(shipped)},
            "drawn_and_rejected_as_seen": rejected, "overlap": 0,
            "accuracy_problems_in_training_streams": accuracy_in_training}


# ---- models and drafters ------------------------------------------------------------------------------------------
def build_tiny_base(folder: Path, seed: int) -> Path:
    """`--model tiny`: a fresh (untrained) 2-layer Llama with the character tokenizer of the tiny recipe."""
    from understudy.engine.loader import save_model
    from understudy.trainer.chartok import make_char_tokenizer
    from understudy.trainer.pretrain import PretrainConfig, build_model

    cfg = PretrainConfig(task=TASK, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                         max_seq_len=1024, seed=seed)
    tok = make_char_tokenizer()
    save_model(build_model(cfg, len(tok)), tok, folder, extra_config={"understudy_demo": "untrained tiny base"})
    return folder


def profile_for(model_path: Path) -> str:
    cfg = json.loads((model_path / "config.json").read_text())
    return "tiny" if int(cfg.get("hidden_size", 1 << 20)) <= 256 else "full"


def find_generic_drafter(spec: str | None, fingerprint: str) -> tuple[Path | None, str]:
    """The generic drafter: `--generic-drafter` (a folder, or a version/alias of the user's registry), else the
    newest drafter for this model in the user's registry (what `make serve` trained), else None."""
    from understudy.registry.store import Registry, RegistryError

    if spec and Path(spec).expanduser().is_dir():
        return Path(spec).expanduser().absolute(), f"--generic-drafter {spec}"
    try:
        reg = Registry.open(None, create=False)
    except RegistryError as e:
        if spec:
            raise UserError(f"--generic-drafter {spec!r}: not a folder, and the user registry cannot be read ({e})") from e
        return None, "none in the user registry"
    if spec:
        try:
            v, path = reg.checkout(spec, fingerprint)
        except RegistryError as e:
            raise UserError(f"--generic-drafter {spec!r}: not a folder, and not a usable version of {reg.root} ({e})") from e
        return path, f"version {v} of {reg.root}"
    mine = [i for i in reg.list_versions() if i.kind == "drafter" and i.family_fingerprint == fingerprint
            and i.policy is None]
    for info in sorted(mine, key=lambda i: i.version, reverse=True):
        try:
            v, path = reg.checkout(info.version, fingerprint)
        except RegistryError:
            continue
        return path, f"version {v} of {reg.root} (the newest drafter for this model there)"
    return None, f"none for this model in {reg.root}"


def _last_json(path: Path) -> dict[str, Any]:
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise DemoError(f"{path}: no JSON result line; see the log beside it")


# ---- the run ----------------------------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    planned_s: float | None
    start: float
    end: float | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.end is None else round(self.end - self.start, 1)


@dataclass
class Results:
    """What the run measured, phase by phase (summary.json is built from it)."""

    heldout: dict[str, Any] = field(default_factory=dict)
    generic: dict[str, Any] = field(default_factory=dict)
    starting_pair: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    sft_pair: dict[str, Any] = field(default_factory=dict)
    adapt: dict[str, Any] = field(default_factory=dict)
    grpo_steps: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows
    grpo_invocations: list[dict[str, Any]] = field(default_factory=list)
    final_pair: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    drafter_evals: list[dict[str, Any]] = field(default_factory=list)
    locust_runs: list[dict[str, Any]] = field(default_factory=list)
    drafter_evals_skipped: list[str] = field(default_factory=list)  # (drafter, target) pairs left out for time


class DemoRun:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.out = plan.out
        self.t0 = time.time()
        self.phases: list[Phase] = []
        self.res = Results()
        self.machine = machine_info()
        self.children = Children(self.out / "logs", ROOT, str(self.out))
        self.api_key, self.admin_key = f"sk-demo-{secrets.token_hex(8)}", f"adm-demo-{secrets.token_hex(8)}"
        self.model_path: Path | None = None
        self.generic_path: Path | None = None
        self.registry = self.out / "registry"
        self.server: Any = None
        self.url = ""
        self.load: LoadDriver | None = None
        self.poller: SwapPoller | None = None
        self.prompts = self.out / "prompts" / "heldout.jsonl"
        self.events = self.out / "load" / "events-run.jsonl"

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str, planned_s: float | None = None) -> Any:
        ph = Phase(name, None if planned_s is None else round(planned_s, 1), time.time())
        self.phases.append(ph)
        self._progress(name, "start")
        yield ph
        ph.end = time.time()
        self._progress(name, "end", seconds=ph.seconds)

    def _progress(self, name: str, event: str, **extra: Any) -> None:
        rec = {"t": round(time.time(), 3), "elapsed_s": round(time.time() - self.t0, 1), "phase": name,
               "event": event, **extra}
        with open(self.out / "progress.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if event == "start":
            typer.echo(f"[demo {rec['elapsed_s'] / 60:5.1f} min] {name}", err=True)

    def remaining_until(self, share_key: str) -> float:
        return self.t0 + self.plan.share_s(share_key) - time.time()

    # ---- the phases -------------------------------------------------------------------------------------------
    def execute(self) -> None:
        self.prepare()
        self.start_serving()
        self.sft_phase()
        self.adapt_phase()
        self.grpo_phase()
        self.finish_load()
        self.spec_phase()
        self.drafter_eval_phase()

    def prepare(self) -> None:
        from understudy.engine.loader import folder_family, resolve_model_path

        with self.phase("prepare: prompts, base model, generic drafter, registry"):
            self.res.heldout = make_prompt_files(self.plan, self.prompts.parent)
            if self.plan.model == "tiny":
                self.model_path = build_tiny_base(self.out / "base-tiny", self.plan.seed)
            else:
                self.model_path = resolve_model_path(self.plan.model)
            fingerprint, _ = folder_family(str(self.model_path))
            path, where = find_generic_drafter(self.plan.generic_drafter, fingerprint)
            self.res.generic = {"source": where, "trained_here": path is None}
        if path is None:
            path = self.train_generic_drafter()
        self.generic_path = path
        self.res.generic["path"] = str(path)
        with self.phase("publish the starting pair (base model, generic drafter)"):
            self.res.starting_pair = self.publish_drafter(path, None, "demo: the generic drafter, for the base model")

    def train_generic_drafter(self) -> Path:
        minutes = self.plan.share_s("generic_drafter") / 60
        out = self.out / "generic-drafter"
        with self.phase("generic drafter: `understudy drafter train` (none found)", minutes * 60):
            self.children.run("generic-drafter", _py(
                "drafter", "train", "--model", self.model_arg, "--out", str(out), "--max-minutes", f"{minutes:.2f}",
                "--max-new-tokens", str(self.plan.profile.generic_tokens), "--seed", str(self.plan.seed),
                "--threads", "1"),  # the serving server has the other core (as for SFT below)
                timeout_s=minutes * 60 * 3 + 600, what="training the generic drafter")
        return out

    @property
    def model_arg(self) -> str:
        return str(self.model_path) if self.plan.model == "tiny" else self.plan.model

    def publish_drafter(self, folder: Path, policy: int | None, note: str) -> dict[str, Any]:
        name = f"publish-drafter-{len(self.children.record)}"
        args = ["drafters", "publish", str(folder), "--registry", str(self.registry), "--note", note, "--json"]
        if policy is not None:
            args += ["--policy", str(policy)]
        out = self.out / "logs" / f"{name}.json"
        self.children.run(name, _py(*args), timeout_s=600, stdout=out, what=f"publishing the drafter {folder}")
        doc = json.loads(out.read_text())
        return {"drafter_version": doc["version"], "policy_version": policy, "aliases": doc.get("aliases"),
                "heldout_acceptance_length": (doc.get("manifest", {}).get("metrics") or {}).get(
                    "heldout_acceptance_length")}

    def publish_policy(self, folder: Path, note: str) -> int:
        name = f"publish-policy-{len(self.children.record)}"
        out = self.out / "logs" / f"{name}.json"
        self.children.run(name, _py("drafters", "publish-policy", str(folder), "--registry", str(self.registry),
                                    "--note", note, "--json"), timeout_s=600, stdout=out,
                          what=f"publishing the policy {folder}")
        return int(json.loads(out.read_text())["version"])

    # ---- serving and load -------------------------------------------------------------------------------------
    def server_command(self, port: int, extra: list[str]) -> list[str]:
        return _py("serve", "--model", self.model_arg, "--registry", str(self.registry), "--host", "127.0.0.1",
                   "--port", str(port), *extra)

    def start_server(self, name: str, extra: list[str]) -> tuple[Any, str]:
        from understudy.clients.client import UnderstudyClient

        port = _free_port()
        proc = self.children.start(name, self.server_command(port, extra),
                                   {"UNDERSTUDY_API_KEY": self.api_key, "UNDERSTUDY_ADMIN_KEY": self.admin_key})
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        with UnderstudyClient(url, api_key=self.api_key, timeout=5) as c:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise DemoError(f"the server ({name}) exited with status {proc.returncode} before it was ready; "
                                    f"see {self.children.log_path(name)}")
                with contextlib.suppress(Exception):
                    if c.ready():
                        return proc, url
                time.sleep(0.5)
        raise DemoError(f"the server ({name}) was not ready within 900 s; see {self.children.log_path(name)}")

    def admin(self) -> Any:
        """A client of the run's server with the admin key (a context manager)."""
        from understudy.clients.client import UnderstudyClient

        return UnderstudyClient(self.url, api_key=self.api_key, admin_key=self.admin_key, timeout=20)

    def admin_state(self) -> dict[str, Any]:
        with self.admin() as c:
            return dict(c.current_drafter())

    def warm_up(self, url: str, n: int = 2) -> None:
        """A few short requests before a measurement (first-request costs are not what it measures)."""
        from understudy.clients.client import UnderstudyClient

        prompt = json.loads(self.prompts.read_text().splitlines()[0])["prompt"]
        with UnderstudyClient(url, api_key=self.api_key, timeout=300) as c:
            for _ in range(n):
                c.chat([{"role": "user", "content": prompt}], max_tokens=8, temperature=0.0)

    def start_serving(self) -> None:
        with self.phase("server following `latest` + Locust on held-out prompts"):
            # one thread: the demo's training (SFT, GRPO, drafters) runs on the other core all along
            self.server, self.url = self.start_server("server", ["--follow", "latest", "--threads", "1"])
            self.poller = SwapPoller(self.admin_state)
            self.poller.poll_once()
            self.poller.start()
            self.events.parent.mkdir(parents=True, exist_ok=True)
            p = self.plan.profile
            self.load = LoadDriver(self.children, LOCUSTFILE, self.url, self.api_key, self.plan.users,
                                   p.locust_max_tokens, self.prompts, self.events,
                                   until=self.t0 + self.plan.share_s("train_end"), min_run_s=p.min_load_s * 2,
                                   name="locust-run")
            self.load.start()

    def finish_load(self) -> None:
        assert self.load is not None
        with self.phase("load: the last Locust run ends (its streams complete)"):
            self.load.finish(timeout_s=max(0.0, self.remaining_until("train_end")) + 600.0)
            self.res.locust_runs += [{"phase": "run", **r} for r in self.load.runs]

    # ---- training ---------------------------------------------------------------------------------------------
    def sft_phase(self) -> None:
        minutes = self.plan.sft_seconds(time.time() - self.t0) / 60
        out = self.out / "sft"
        with self.phase("SFT (`understudy sft`; held-out accuracy before = the baseline, and after)", minutes * 60):
            p = self.plan.profile
            result = self.out / "logs" / "sft.json"
            self.children.run("sft", _py(
                "sft", "--out", str(out), "--model", self.model_arg, "--task", TASK, "--max-minutes", f"{minutes:.3f}",
                "--lr", str(p.sft_lr), "--batch-size", str(p.sft_batch), "--eval-problems", str(self.plan.eval_problems),
                "--max-new-tokens", str(MAX_NEW_TOKENS), "--seed", str(self.plan.sft_seed),
                # one thread: the serving server has the other core (a 1-thread competitor: 18.6 s per SFT step
                # with 1 thread, 22.8 s with 2, SmolLM2, batch 8, float32). Precision auto: bfloat16 mixed
                # precision where the CPU has AMX (1.56x per step, docs/trainer-tasks.md), float32 on AVX2-only CPUs
                "--threads", "1", "--precision", "auto"),
                timeout_s=minutes * 60 * 3 + 1800, stdout=result, what="SFT")
            self.res.sft = _last_json(result)

    def adapt_phase(self) -> None:
        seconds = max(10.0, self.plan.share_s("adapt"))
        assert self.generic_path is not None
        out = self.out / "sft-drafter"
        with self.phase("SFT pair: a drafter trained on the SFT policy's answers, published with it", seconds):
            result = self.out / "logs" / "adapt-drafter.json"
            self.children.run("adapt-drafter", _py(
                "demo", "adapt-drafter", "--model", str(self.out / "sft"), "--drafter", str(self.generic_path),
                "--prompts", str(self.prompts.parent / "adapt.jsonl"), "--out", str(out), "--seconds", f"{seconds:.0f}",
                "--max-new-tokens", str(MAX_NEW_TOKENS), "--seed", str(self.plan.seed)),
                timeout_s=seconds * 3 + 900, stdout=result, what="training the SFT policy's drafter")
            self.res.adapt = _last_json(result)
            policy = self.publish_policy(self.out / "sft", "demo: the SFT policy")
            self.res.sft_pair = self.publish_drafter(out, policy, "demo: the drafter trained on the SFT policy's answers")

    def train_config(self) -> Path:
        p, out = self.plan.profile, self.out / "grpo"
        cfg = {"policy": str(self.out / "sft"), "task": TASK, "steps": 1, "prompts_per_step": p.grpo_prompts,
               "group_size": p.grpo_group, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "lr": p.grpo_lr,
               "speculation": True, "num_draft_tokens": K, "controller_arms": [0, 2, K], "rollout_workers": 2,
               "spot_training": True, "drafter_init": str(self.out / "sft-drafter"), "drafter_warmup_s": 0.0,
               "drafter_lr": p.drafter_lr, "drafter_unroll_steps": 2, "micro_batch_tokens": 2048,
               "out_dir": str(out), "registry": str(self.registry), "publish_every": 1, "checkpoint_every": 1,
               "eval_every": 1, "eval_problems": self.plan.eval_problems, "seed": self.plan.seed}
        path = self.out / "grpo.toml"
        path.write_text("# written by `understudy demo grid-risk`: GRPO + TLT on the SFT policy\n" +
                        "".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items()))
        return path

    def grpo_phase(self) -> None:
        from understudy.trainer.metrics_log import read_metrics

        config = self.train_config()
        with self.phase("GRPO + TLT (`understudy train`, a pair published every step)",
                        self.remaining_until("train_end")):
            step = 0
            while True:
                t = time.time()
                self.children.run(f"train-step{step + 1}", _py(
                    "train", "--config", str(config), "--steps", str(step + 1), "--resume"),
                    timeout_s=max(1800.0, self.plan.budget_s), what=f"GRPO step {step + 1}")
                step += 1
                took = time.time() - t
                self.res.grpo_invocations.append({"step": step, "seconds": round(took, 1), "ended": time.time()})
                if time.time() + took > self.t0 + self.plan.share_s("train_end"):
                    break
        self.res.grpo_steps = read_metrics(self.out / "grpo" / "metrics.jsonl")

    # ---- speculation on vs off --------------------------------------------------------------------------------
    def spec_phase(self) -> None:
        """On vs off on the run's own server and final pair: the operator's switch (POST /admin/controller) pins
        K at 0 for the off windows and hands K back to the adaptive controller for the on windows. The windows
        alternate (on, off, on, off) so that a drift of the shared box's load falls on both modes alike."""
        assert self.poller is not None
        self.poller.poll_once()
        state = self.poller.last_state or {}
        version, policy = str(state.get("version")), state.get("policy")
        self.res.final_pair = {"drafter_version": version, "policy": policy, "following": state.get("following")}
        if not version.isdigit():
            raise DemoError(f"the server serves no registry pair at the end (drafter {version!r}); see "
                            f"{self.children.log_path('server')}")
        seconds = max(2 * self.plan.profile.min_load_s, self.plan.share_s("spec_each"))
        window = seconds / SPEC_WINDOWS
        p, load = self.plan.profile, self.out / "load"
        self.warm_up(self.url)
        pulls: list[dict[str, Any]] = []
        try:
            for w in range(SPEC_WINDOWS):
                for mode, k in (("on", None), ("off", 0)):
                    with self.phase(f"speculation {mode}, window {w + 1} of {SPEC_WINDOWS}", window):
                        before = self.pin_speculation(k)
                        self.res.locust_runs.append({"phase": f"spec-{mode}", "window": w, **run_locust_once(
                            self.children, LOCUSTFILE, self.url, self.api_key, self.plan.users, p.locust_max_tokens,
                            self.prompts, load / f"events-spec-{mode}.jsonl", window, f"locust-spec-{mode}-{w}")})
                        if mode == "on":
                            pulls.append(arm_pulls_between(before, self.controller_state()))
        finally:
            with contextlib.suppress(Exception):  # the server may be gone already (the error says why)
                self.pin_speculation(None)
        self.poller.stop()
        self.poller.poll_once()  # the server's last swap records, then its cores go to the drafter evaluations
        self.children.stop(self.server, grace_s=180)
        self.res.spec = {"seconds_each": round(seconds), "windows": SPEC_WINDOWS, "pair": self.res.final_pair,
                         "on": "the run's server, K chosen by its adaptive controller (arms 0, 2, 4)",
                         "off": "the same server and pair, K pinned at 0 (POST /admin/controller)",
                         "on_arm_pulls": pulls}

    def pin_speculation(self, k: int | None) -> dict[str, Any]:
        with self.admin() as c:
            return dict(c.pin_speculation(k))

    def controller_state(self) -> dict[str, Any]:
        with self.admin() as c:
            return dict(c.controller())

    # ---- drafter acceptance -----------------------------------------------------------------------------------
    def eval_jobs(self) -> list[dict[str, Any]]:
        """(drafter, target) pairs to evaluate, most important first: the final co-trained drafter and the generic
        one on the final policy, the generic one on its own base model, the SFT policy's, then the other
        co-trained steps (first, then spread), as long as the budget lasts."""
        grpo, base = self.out / "grpo", str(self.model_path)
        steps = [r for r in self.res.grpo_steps if isinstance(r.get("published"), dict)
                 and r["published"].get("drafter_version") is not None]
        if not steps:
            raise DemoError(f"GRPO published no pair; see {grpo / 'metrics.jsonl'} and the train-step logs")
        last = steps[-1]

        def cotrained(r: dict[str, Any]) -> dict[str, Any]:
            s = int(r["step"])
            return {"label": f"co-trained, step {s}", "kind": "co-trained", "role": "step", "step": s,
                    "drafter": str(grpo / f"drafter-step{s:05d}"), "drafter_version": r["published"]["drafter_version"],
                    "target": str(grpo / f"policy-step{s:05d}"), "target_label": f"GRPO step {s} policy",
                    "policy_version": r["published"].get("policy_version")}

        final_target = cotrained(last)["target"]
        generic = str(self.generic_path)
        v1 = self.res.starting_pair.get("drafter_version")
        jobs = [{**cotrained(last), "role": "final co-trained"},
                {"label": "generic", "kind": "generic", "role": "final generic", "drafter": generic, "drafter_version": v1,
                 "target": final_target, "target_label": f"GRPO step {last['step']} policy (final)"},
                {"label": "generic, on its own base model", "kind": "generic", "role": "base generic", "drafter": generic,
                 "drafter_version": v1, "target": base, "target_label": "base model"},
                {"label": "SFT policy's drafter", "kind": "sft-adapted", "role": "sft", "drafter": str(self.out / "sft-drafter"),
                 "drafter_version": self.res.sft_pair.get("drafter_version"), "target": str(self.out / "sft"),
                 "target_label": "SFT policy", "policy_version": self.res.sft_pair.get("policy_version")}]
        rest = steps[:-1]
        order = ([rest[0]] if rest else []) + _spread(rest[1:])
        return jobs + [cotrained(r) for r in order]

    def drafter_eval_phase(self) -> None:
        p = self.plan.profile
        jobs = self.eval_jobs()
        with self.phase("drafter eval (`understudy drafter eval`) on the held-out prompts",
                        self.remaining_until("evals_end")):
            took = 0.0
            for i, job in enumerate(jobs):
                if i >= 2 and time.time() + took > self.t0 + self.plan.share_s("evals_end"):
                    break  # the first two (co-trained vs generic on the final policy) always run
                t = time.time()
                out = self.out / "eval" / f"drafter-{i:02d}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                self.children.run(f"drafter-eval-{i:02d}", _py(
                    "drafter", "eval", job["drafter"], "--model", job["target"], "--prompts", str(self.prompts),
                    "--limit", str(p.drafter_eval_prompts), "--max-new-tokens", str(p.drafter_eval_tokens),
                    "--max-k", str(K), "--json"), timeout_s=1800, stdout=out, what=f"drafter eval ({job['label']})")
                took = time.time() - t
                s = json.loads(out.read_text())["sets"][0]
                self.res.drafter_evals.append({**job, "acceptance_length": s["acceptance_length_at_k"][str(K)],
                                               "per_position_acceptance": s["per_position_acceptance"],
                                               "num_sequences": s["num_sequences"], "split": s["split"],
                                               "best_k": s["predicted"]["best_k"],
                                               "predicted_speedup": s["predicted"]["best_speedup"],
                                               "result": str(out)})
            self.res.drafter_evals_skipped = [f"{j['label']} on {j['target_label']}"
                                              for j in jobs[len(self.res.drafter_evals):]]

    # ---- teardown ---------------------------------------------------------------------------------------------
    def teardown(self) -> None:
        if self.poller is not None:
            self.poller.stop()
        if self.load is not None:
            self.load.abort()
        self.children.stop_all()
        if self.load is not None and self.load.is_alive():
            self.load.join(30)


def arm_pulls_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Steps the adaptive controller ran with each K between two of its states, per batch-size bucket."""
    out: dict[str, dict[str, int]] = {}
    for bucket, b in (after.get("buckets") or {}).items():
        was = ((before.get("buckets") or {}).get(bucket) or {}).get("pulls") or {}
        delta = {k: int(n) - int(was.get(k, 0)) for k, n in (b.get("pulls") or {}).items()}
        if any(delta.values()):
            out[bucket] = delta
    return out


def _spread(items: list[Any]) -> list[Any]:
    """Items in an order that covers their range early: the middle, then the middles of the halves, ..."""
    out, segments = [], [(0, len(items))]
    while segments:
        lo, hi = segments.pop(0)
        if lo < hi:
            mid = (lo + hi) // 2
            out.append(items[mid])
            segments += [(lo, mid), (mid + 1, hi)]
    return out


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def check_requirements(out: Path, minutes: float, users: int) -> None:
    if minutes <= 0 or minutes > 24 * 60:
        raise UserError(f"--minutes must be in (0, 1440], got {minutes}")
    if users < 1:
        raise UserError(f"--users must be >= 1, got {users}")
    if not LOCUSTFILE.is_file():
        raise UserError(f"{LOCUSTFILE} is missing: `understudy demo` drives the load tests of a checkout of the "
                        "repository; run it from one (`make demo`)")
    for mod, why in (("locust", "the load"), ("matplotlib", "the report's plots")):
        if importlib.util.find_spec(mod) is None:
            raise UserError(f"{mod} is not installed ({why}); it is a dev dependency: `make install` or "
                            "pip install -e '.[dev]'")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty: the demo starts from a fresh registry; pass a new "
                        "folder or remove it")


@demo_app.command("grid-risk")
def grid_risk(
    minutes: Annotated[float, typer.Option("--minutes", help="Budget for the whole run; the phases get shares")] = 40.0,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder (default: runs/demo-grid-risk-<time>); "
                                             "report.md and summary.json land here")] = None,
    model: Annotated[str, typer.Option("--model", help="smollm2-135m (preset), tiny (an untrained 2-layer model: "
                                       "a quick check of the loop), or an HF folder")] = "smollm2-135m",
    users: Annotated[int, typer.Option("--users", help="Concurrent streaming Locust users")] = 2,
    generic_drafter: Annotated[str | None, typer.Option(
        "--generic-drafter", help="The generic drafter: a folder, or a version/alias of your registry (default: the "
        "newest one for the model there, as `make serve` trains it; else one is trained now)")] = None,
    eval_problems: Annotated[int | None, typer.Option(
        "--eval-problems", help="Held-out problems of the accuracy evaluations (default: 32, 16 under 30 minutes, "
        "8 for tiny models)")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Serve, train (SFT, then GRPO + TLT publishing pairs) under Locust load on held-out grid-risk prompts, measure,
    and write OUT/report.md (with PNG plots) and OUT/summary.json. See understudy/cli/demo.py."""
    from understudy.cli.demo_report import write_report
    from understudy.engine.loader import resolve_model_path

    out = (out or ROOT / "runs" / f"demo-grid-risk-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    check_requirements(out, minutes, users)
    if model != "tiny":
        resolve_model_path(model)  # a missing preset or folder fails now, not after the setup
    kind = "tiny" if model == "tiny" else profile_for(resolve_model_path(model))
    problems = eval_problems or (8 if kind == "tiny" else 32 if minutes >= 30 else 16)
    if problems < 1:
        raise UserError(f"--eval-problems must be >= 1, got {problems}")
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(model, out, minutes, users, seed, PROFILES[kind], problems, generic_drafter)
    run = DemoRun(plan)
    typer.echo(f"demo grid-risk: {minutes:g} min on {run.machine['cpu_model']} ({run.machine['cores']} cores); "
               f"writing to {out}", err=True)
    if kind == "full" and minutes < 30:
        typer.echo("note: below about 30 minutes, the fixed costs of a SmolLM2-size model (loading it in each "
                   "process, the accuracy evaluations) exceed the phases' shares: the run takes longer than "
                   "--minutes, and GRPO gets its one guaranteed step", err=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # Ctrl-C stops the run even when this process inherited SIGINT ignored (a shell starts background jobs so,
    # and Python then installs no handler of its own)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    status, error = "failed", None
    try:
        run.execute()
        status = "ok"
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        try:
            run.teardown()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous)
        try:
            summary = build_summary(run, status, error)
        except Exception as e:  # a partial run: keep what is known, never hide the run's own error
            summary = {"demo": "grid-risk", "status": status, "error": error, "summary_error": repr(e),
                       "children_left": len(leftover_processes(str(out)))}
        write_json(out / "summary.json", summary)
    report = write_report(summary, out)
    typer.echo(f"report: {report}\nsummary: {out / 'summary.json'}", err=True)


# ---- summary ----------------------------------------------------------------------------------------------------
def _read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_summary(run: DemoRun, status: str, error: str | None) -> dict[str, Any]:
    from understudy.cli.demo_report import accuracy_curve, request_stats

    plan, res = run.plan, run.res
    swaps = run.poller.swaps() if run.poller is not None else []
    load = run.out / "load"
    events = {k: _read_events(load / f"events-{k}.jsonl") for k in ("run", "spec-on", "spec-off")}
    serving = request_stats(events["run"])
    spec_on, spec_off = request_stats(events["spec-on"]), request_stats(events["spec-off"])
    curve = accuracy_curve(res.sft, res.grpo_steps)
    greedy = [c for c in curve if c.get("greedy") is not None]
    evals = res.drafter_evals
    headline = {
        "accuracy_before": greedy[0]["greedy"] if greedy and greedy[0]["stage"] == "base" else None,
        "accuracy_after": greedy[-1]["greedy"] if greedy and greedy[-1]["stage"] == "GRPO" else None,
        "constant_answer": res.sft.get("constant_answer"),
        "constant_answer_accuracy": res.sft.get("constant_answer_accuracy"),
        "problems_where_constant_fails": res.sft.get("problems_where_constant_fails"),
        "accuracy_where_constant_fails_before": res.sft.get("initial_accuracy_where_constant_fails"),
        "accuracy_where_constant_fails_sft": res.sft.get("accuracy_where_constant_fails"),
        "cotrained_acceptance_length": _role(evals, "final co-trained"),
        "generic_acceptance_length": _role(evals, "final generic"),
        "tpot_p50_ms_spec_on": spec_on["tpot_ms"]["p50"], "tpot_p50_ms_spec_off": spec_off["tpot_ms"]["p50"],
        "failed_requests_across_swaps": serving["failed"],
        "pair_swaps": sum(s.get("result") == "success" for s in swaps),
    }
    machine = {**run.machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    return {
        "demo": "grid-risk", "status": status, "error": error, "out": str(run.out),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(run.t0)),
        "budget_minutes": plan.minutes, "elapsed_minutes": round((time.time() - run.t0) / 60, 2),
        "machine": machine, "model": plan.model, "model_path": str(run.model_path), "profile": asdict(plan.profile),
        "seed": plan.seed, "users": plan.users, "k": K, "shares": SHARES, "t0": run.t0,
        "phases": [{"name": p.name, "planned_s": p.planned_s, "start_s": round(p.start - run.t0, 1),
                    "seconds": p.seconds} for p in run.phases],
        "headline": headline,
        "heldout_prompts": res.heldout,
        "accuracy": {"problems": plan.eval_problems, "max_new_tokens": MAX_NEW_TOKENS, "decoding": "greedy",
                     "curve": curve, "before": headline["accuracy_before"], "after": headline["accuracy_after"]},
        "generic_drafter": res.generic, "starting_pair": res.starting_pair,
        "sft": res.sft, "sft_drafter": res.adapt, "sft_pair": res.sft_pair,
        "grpo": {"steps": len(res.grpo_steps) - 1 if res.grpo_steps else 0, "invocations": res.grpo_invocations,
                 "published": [{"step": r["step"], **r["published"]} for r in res.grpo_steps
                               if isinstance(r.get("published"), dict)],
                 "rollout_acceptance_length": [{"step": r["step"], "mean": (r.get("spec") or {}).get(
                     "mean_acceptance_length")} for r in res.grpo_steps if r.get("step")]},
        "drafters": {"k": K, "prompts": str(run.prompts), "evaluated": evals,
                     "not_evaluated_for_time": res.drafter_evals_skipped},
        "serving": {**serving, "swaps": swaps,
                    "swaps_by_result": {r: sum(s.get("result") == r for s in swaps)
                                        for r in sorted({str(s.get("result")) for s in swaps})},
                    "final_state": (run.poller.last_state or {}) if run.poller else {},
                    "swap_polls_failed": run.poller.errors if run.poller else None,
                    "swap_poll_last_error": run.poller.last_error if run.poller else None},
        "speculation": {**res.spec, "on_stats": spec_on, "off_stats": spec_off,
                        "tpot_p50_ratio_off_over_on": _ratio(spec_off["tpot_ms"]["p50"], spec_on["tpot_ms"]["p50"])},
        "failed_requests": {"run": serving["failed"], "spec_on": spec_on["failed"], "spec_off": spec_off["failed"]},
        "locust_runs": res.locust_runs,
        "children": run.children.record,
        "children_left": len(leftover_processes(str(run.out))),
    }


def _role(evals: list[dict[str, Any]], role: str) -> float | None:
    return next((e["acceptance_length"] for e in evals if e.get("role") == role), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# ---- the SFT pair's drafter ---------------------------------------------------------------------------------------
@demo_app.command("adapt-drafter", hidden=True)
def adapt_drafter(
    model: Annotated[str, typer.Option("--model", help="The policy the drafter is trained for (the SFT output)")],
    drafter: Annotated[Path, typer.Option("--drafter", help="The generic drafter: its held-out acceptance on this "
                                          "policy is the 'before' figure")],
    prompts: Annotated[Path, typer.Option("--prompts", help="JSONL: 'train' rows to answer, 'heldout' rows to measure")],
    out: Annotated[Path, typer.Option("--out", help="Drafter folder to write")],
    seconds: Annotated[float, typer.Option("--seconds", help="Budget: half answers, the rest trains")] = 60.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = MAX_NEW_TOKENS,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """The SFT policy's own drafter, trained by `understudy drafter train`'s recipe (a fresh drafter whose draft
    vocabulary comes from the policy's answers) on the policy's greedy and sampled answers to training problems.
    Prints held-out acceptance of the generic drafter (before) and of this one (after) as JSON.

    Adapting the generic drafter instead (its general-chat draft vocabulary, lr 3e-4, greedy answers only) reached
    L(4) 1.16 in the 30-minute demo of docs/results.md; this recipe on a grid-risk SFT policy reached 4.5 at K=4
    in 6 minutes of training (docs/results.md)."""
    import torch

    from understudy.drafter.model import load_drafter
    from understudy.drafter.train import evaluate
    from understudy.drafter.warmup import WarmupConfig, build_dataset, warmup_train
    from understudy.engine.loader import load_model

    t0 = time.monotonic()
    torch.set_num_threads(1)  # the serving server has the other core
    lm = load_model(model, dtype="float32")
    cfg = WarmupConfig(prompts=(str(prompts),), max_minutes=seconds / 60, max_new_tokens=max_new_tokens,
                       data_workers=1, eval_k=K, seed=seed)
    report = warmup_train(lm, out, cfg)
    if not report.get("heldout"):
        raise DemoError(f"{prompts}: no 'heldout' answers were measured; the drafter has no acceptance figure")
    held = build_dataset(lm, cfg)[1]  # the cached answers warmup_train measured on
    generic = load_drafter(drafter, lm.model, lm.fingerprint).float().bind(lm.model)
    before = evaluate(generic, lm.model, held, k=K, cache_greedy=True)
    typer.echo(json.dumps({
        "steps": report["steps"], "train_sequences": report["num_train_sequences"], "heldout_sequences": len(held),
        "heldout_acceptance_length_before": before["expected_acceptance_length"],
        "heldout_acceptance_length": report["heldout_acceptance_length"], "heldout": report["heldout"],
        "recipe": "understudy drafter train (fresh drafter)", "generic": str(drafter), "policy": model,
        "seconds": round(time.monotonic() - t0, 1)}))
