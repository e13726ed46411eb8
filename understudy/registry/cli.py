"""`understudy drafters ...`: list, show, verify, publish, promote, rollback and gc over the registry of drafters
and policies (target + drafter pairs; see understudy.registry.store).

With --server URL, `list` and `rollback` act on a live server's admin API instead (as do `current`, `pin` and
`follow`, added by understudy.clients.cli_client); the composing CLI (understudy.cli.main) hands this module the
client's functions through the click context (`obj["remote_admin"]`), so the registry never imports the client. Human tables by default, --json for scripts. Every failure
raises RegistryError (the top-level main prints `error: ...` and exits 2). Importing this module does not
import torch (only `publish` needs it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from understudy.registry.store import (
    BEST_METRIC,
    HISTORY_WINDOW,
    KEEP_LAST,
    TMP_MAX_AGE_S,
    Registry,
    RegistryError,
    VersionInfo,
)

drafters_app = typer.Typer(no_args_is_help=True,
                           help="The registry of drafters and policies: immutable versions, aliases naming "
                                "target + drafter pairs (latest, best, serving), rollback.")

RegistryOpt = Annotated[str | None, typer.Option(
    "--registry", help="Registry folder (default: $UNDERSTUDY_REGISTRY, else ~/.local/share/understudy/registry)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts)")]
ServerOpt = Annotated[str | None, typer.Option(
    "--server", help="Act on a live server's admin API (http://host:port) instead of the local registry")]
AdminKeyOpt = Annotated[str | None, typer.Option("--admin-key", help="With --server (default: $UNDERSTUDY_ADMIN_KEY)")]
HistoryWindowOpt = Annotated[int, typer.Option("--history-window",
                                               help="Also keep what each alias pointed to in its last N moves")]


def _remote(ctx: typer.Context) -> Any:
    """The live-server admin functions the composing CLI provides (server_list, server_rollback)."""
    remote = (ctx.find_root().obj or {}).get("remote_admin")
    if remote is None:
        raise RegistryError("--server is only available from the `understudy` command (it talks to a live server)")
    return remote


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _fmt_metric(m: dict[str, Any]) -> str:
    x = m.get(BEST_METRIC)
    return f"{x:.3f}" if isinstance(x, int | float) and not isinstance(x, bool) else "-"


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _by_version(aliases: dict[str, int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, v in sorted(aliases.items()):
        out.setdefault(v, []).append(name)
    return out


def _open(registry: str | None) -> Registry:
    return Registry.open(registry, create=False)  # reading never creates a registry


@drafters_app.command("list")
def list_cmd(ctx: typer.Context, registry: RegistryOpt = None, as_json: JsonOpt = False, server: ServerOpt = None,
             admin_key: AdminKeyOpt = None) -> None:
    """List versions (oldest first) with their family, held-out acceptance length and aliases."""
    if server is not None:
        return _remote(ctx).server_list(server, admin_key, as_json)
    reg = _open(registry)
    versions, aliases = reg.list_versions(), reg.aliases()
    pairs = {name: reg.resolve_pair(name) for name in aliases}
    if as_json:
        _echo_json({"registry": str(reg.root), "aliases": aliases,
                    "pairs": {n: {"drafter": d, "policy": p} for n, (d, p) in pairs.items()},
                    "versions": [{"version": i.version, "path": str(i.path), **i.manifest} for i in versions]})
        return
    typer.echo(f"registry {reg.root}: {len(versions)} version(s)")
    names = _by_version(aliases)
    rows = [[str(i.version), i.kind, str(i.manifest.get("created", "-"))[:19].replace("T", " "), i.family_fingerprint,
             _fmt_metric(i.metrics), _fmt_policy(i), str(i.manifest.get("parent") or "-"),
             _fmt_size(i.size_bytes), ",".join(names.get(i.version, []))] for i in versions]
    _table(rows, ["VERSION", "KIND", "CREATED (UTC)", "FAMILY", "ACCEPT_LEN", "POLICY", "PARENT", "SIZE", "ALIASES"])
    drift = [f"{n} -> drafter {d} + {_pname(p)}" for n, (d, p) in pairs.items() if p != reg.info(d).policy]
    if drift:
        typer.echo("aliases pairing a drafter with another policy (drift): " + "; ".join(drift))


def _pname(p: int | None) -> str:
    return "base" if p is None else f"v{p}"


def _fmt_policy(i: VersionInfo) -> str:
    """A drafter's policy (base = the model the server starts with); a policy's own lineage note."""
    return _pname(i.policy) if i.kind == "drafter" else str(i.manifest.get("policy_version") or "-")


def _alias_or_none(reg: Registry, spec: str) -> str | None:
    return spec if spec in reg.alias_names() else None


@drafters_app.command("show")
def show_cmd(spec: Annotated[str, typer.Argument(help="Version number (7, v7) or alias (latest, best, serving)")],
             registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Show one version's manifest (and the alias history when SPEC is an alias)."""
    reg = _open(registry)
    info = reg.info(spec)
    alias = _alias_or_none(reg, spec)
    history = reg.alias_history(alias) if alias else None
    pointing = _by_version(reg.aliases()).get(info.version, [])
    if as_json:
        _echo_json({"version": info.version, "path": str(info.path), "aliases": pointing, "manifest": info.manifest,
                    **({"alias": alias, "alias_history": history} if alias else {})})
        return
    _show_human(info, pointing)
    if alias and history:
        typer.echo(f"alias {alias} history (oldest first):")
        for h in history:
            pol = f" + {_pname(h['policy'])}" if "policy" in h else ""
            typer.echo(f"  {h.get('at', '-')}  -> {h['version']}{pol}  ({h.get('action', 'set')}: "
                       f"{h.get('reason', '')})")


def _show_human(info: VersionInfo, pointing: list[str]) -> None:
    m = info.manifest
    typer.echo(f"version {info.version} ({info.kind})  {info.path}")
    if info.kind == "drafter":
        typer.echo(f"  policy: {_pname(info.policy)}")
    for key in ("created", "family_fingerprint", "policy_version", "parent", "note", "source"):
        typer.echo(f"  {key}: {m.get(key)}")
    t = m.get("target") or {}
    typer.echo(f"  target: {t.get('architecture')} hidden {t.get('hidden_size')} layers {t.get('num_layers')} "
               f"vocab {t.get('vocab_size')} (draft vocab {m.get('draft_vocab_size')})")
    typer.echo(f"  aliases: {', '.join(pointing) or '-'}")
    typer.echo(f"  metrics: {json.dumps(m.get('metrics'), default=str)}")
    typer.echo("  files:")
    for name, f in m["files"].items():
        typer.echo(f"    {name}  {_fmt_size(f['size'])}  sha256 {f['sha256']}")
    typer.echo(f"  training_config: {json.dumps(m.get('training_config'), default=str)}")


@drafters_app.command("verify")
def verify_cmd(specs: Annotated[list[str] | None, typer.Argument(help="Versions or aliases (default: all)")] = None,
               registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Re-hash every file against its manifest; exits non-zero if any version fails."""
    reg = _open(registry)
    nums = [reg.resolve(s) for s in specs] if specs else reg.version_numbers()
    results = [{"version": v, "ok": not (p := reg.verify(v)), "problems": p} for v in nums]
    if as_json:
        _echo_json({"registry": str(reg.root), "results": results})
    else:
        for r in results:
            typer.echo(f"version {r['version']}: " + ("ok" if r["ok"] else "FAILED"))
            for p in r["problems"]:
                typer.echo(f"    {p}")
    bad = [r["version"] for r in results if not r["ok"]]
    if bad:
        raise RegistryError(f"{len(bad)} of {len(results)} version(s) in {reg.root} failed verification ({bad}); do not "
                            "serve them: move aliases off them (`understudy drafters rollback ALIAS` / `promote`) and "
                            "re-publish the drafters")


def _parse_metrics(items: list[str] | None) -> dict[str, Any] | None:
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RegistryError(f"--metric {item!r}: expected KEY=VALUE, e.g. --metric {BEST_METRIC}=2.4")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _read_json_file(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RegistryError(f"--training-config {path}: cannot read a JSON object ({e}); pass a JSON file") from e


@drafters_app.command("publish")
def publish_cmd(
    src: Annotated[Path, typer.Argument(help="A drafter folder (config.json + model.safetensors)")],
    metric: Annotated[list[str] | None, typer.Option("--metric", help=f"KEY=VALUE, repeatable (e.g. {BEST_METRIC}=2.4); "
                                                     "default: the metrics recorded in the drafter's config.json")] = None,
    training_config: Annotated[Path | None, typer.Option("--training-config", help="JSON file with the resolved config")] = None,
    policy_version: Annotated[str | None, typer.Option("--policy-version", help="Free-form lineage: the policy "
                                                       "step it was trained against")] = None,
    policy: Annotated[int | None, typer.Option("--policy", help="The registry's policy version it was trained "
                                               "against (default: the base model); latest then names that pair")] = None,
    parent: Annotated[int | None, typer.Option("--parent", help="Version it was trained from")] = None,
    note: Annotated[str | None, typer.Option("--note", help="Free-text note stored in the manifest")] = None,
    keep_last: Annotated[int, typer.Option("--keep-last", help="Then gc: keep the newest N versions besides "
                                           "aliased ones (0: no gc)")] = KEEP_LAST,
    history_window: HistoryWindowOpt = HISTORY_WINDOW,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import an existing drafter folder (validated first) as the next version; moves latest (and best); then
    deletes old versions no alias reaches, as `gc` does."""
    metrics = _parse_metrics(metric)
    cfg = _read_json_file(training_config)
    pv: str | int | None = int(policy_version) if policy_version and policy_version.isdigit() else policy_version
    if keep_last < 0:
        raise RegistryError(f"--keep-last {keep_last}: pass 0 (no gc) or the number of newest versions to keep")
    reg = Registry.open(registry, create=True)
    info = reg.publish(src, metrics=metrics, training_config=cfg, policy_version=pv, policy=policy, parent=parent,
                       note=note, keep_last=keep_last or None, history_window=history_window)
    moved = sorted(n for n, v in reg.aliases().items() if v == info.version)
    if as_json:
        _echo_json({"version": info.version, "path": str(info.path), "aliases": moved, "manifest": info.manifest})
    else:
        typer.echo(f"published version {info.version} ({info.family_fingerprint}) to {info.path}; "
                   f"aliases now on it: {', '.join(moved) or '-'}")


@drafters_app.command("promote")
def promote_cmd(spec: Annotated[str, typer.Argument(help="Version number or alias to promote")],
                alias: Annotated[str, typer.Argument(help="Alias to point at it (e.g. serving)")],
                reason: Annotated[str | None, typer.Option("--reason", help="Recorded in the alias history")] = None,
                policy: Annotated[str | None, typer.Option(
                    "--policy", help="Pair the drafter with this policy version ('base': the base model); default: "
                    "the policy it was trained against")] = None,
                allow_drift: Annotated[bool, typer.Option(
                    "--allow-drift", help="Allow --policy to differ from the drafter's own")] = False,
                registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Point ALIAS at a pair: a drafter version and its policy (after re-verifying both)."""
    reg = _open(registry)
    before = reg.aliases().get(alias)
    kw: dict[str, Any] = {}
    if policy is not None:
        p = policy.strip().lower().removeprefix("v")
        if p != "base" and not p.isdigit():
            raise RegistryError(f"--policy {policy!r}: pass a policy version number (e.g. 4) or 'base'")
        kw["policy"] = None if p == "base" else int(p)
    v = reg.promote(spec, alias, reason=reason, allow_drift=allow_drift, **kw)
    _, pol = reg.resolve_pair(alias)
    if as_json:
        _echo_json({"alias": alias, "version": v, "policy": pol, "previous": before})
    else:
        typer.echo(f"{alias} -> {v} + {_pname(pol)}" + (f" (was {before})" if before is not None else " (new alias)"))


@drafters_app.command("rollback")
def rollback_cmd(ctx: typer.Context, alias: Annotated[str | None, typer.Argument(help="Alias to return to its previous target")] = None,
                 registry: RegistryOpt = None, as_json: JsonOpt = False, server: ServerOpt = None,
                 admin_key: AdminKeyOpt = None) -> None:
    """Return ALIAS to the target it had before its last move; with --server, roll the live server back (its
    followed alias, else the previously served version)."""
    if server is not None:
        if alias is not None:
            raise RegistryError(f"with --server, rollback takes no ALIAS ({alias!r}): the server rolls back the alias "
                                "it follows; use `understudy drafters current --server URL` to see which")
        return _remote(ctx).server_rollback(server, admin_key, as_json)
    if alias is None:
        raise RegistryError("missing ALIAS: `understudy drafters rollback ALIAS` (local registry) or "
                            "`understudy drafters rollback --server URL` (a live server)")
    reg = _open(registry)
    before = reg.aliases().get(alias)
    v = reg.rollback(alias)
    _, pol = reg.resolve_pair(alias)
    if as_json:
        _echo_json({"alias": alias, "version": v, "policy": pol, "previous": before})
    else:
        typer.echo(f"{alias} -> {v} + {_pname(pol)} (was {before})")


@drafters_app.command("gc")
def gc_cmd(keep_last: Annotated[int, typer.Option("--keep-last", help="Newest versions always kept")] = KEEP_LAST,
           history_window: HistoryWindowOpt = HISTORY_WINDOW,
           tmp_max_age: Annotated[float, typer.Option("--tmp-max-age", help="Seconds after which a .tmp/ entry "
                                                      "without a lock file is removed (those with one go as soon "
                                                      "as their process is dead)")] = TMP_MAX_AGE_S,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would be removed")] = False,
           registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Delete old versions no alias reaches (its target, rollback target, recent history) and leftovers of
    killed publishers. `publish` runs this after every publish (see its --keep-last)."""
    reg = _open(registry)
    removed = reg.gc(keep_last=keep_last, history_window=history_window, dry_run=dry_run, tmp_max_age_s=tmp_max_age)
    if as_json:
        _echo_json({"registry": str(reg.root), "dry_run": dry_run, "removed": removed})
    else:
        verb = "would remove" if dry_run else "removed"
        typer.echo(f"{verb} {len(removed)} version(s){': ' + ', '.join(map(str, removed)) if removed else ''}")


@drafters_app.command("resolve")
def resolve_cmd(spec: Annotated[str, typer.Argument(help="Version number or alias")],
                registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """Print the version number SPEC names (and its folder)."""
    reg = _open(registry)
    v = reg.resolve(spec)
    if as_json:
        _echo_json({"spec": spec, "version": v, "path": str(reg.version_path(v))})
    else:
        typer.echo(f"{v}\t{reg.version_path(v)}")
