"""Client commands of the `understudy` CLI: `chat` and `complete` against a running server, and the live-server
side of `understudy drafters` (`current`, `pin`, `follow`, and `list`/`rollback` with --server).

Importing this module imports neither torch nor httpx; the client is imported when a command runs. Failures
raise UnderstudyError subclasses, which `understudy.cli.main` prints as one `error: ...` line (exit 2).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from understudy.clients.client import UnderstudyClient

DEFAULT_SERVER = "http://127.0.0.1:8000"

ServerOpt = Annotated[str, typer.Option("--server", envvar="UNDERSTUDY_SERVER",
                                        help="Server URL (http://host:port, with or without /v1)")]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", help="API key (default: $UNDERSTUDY_API_KEY)")]
AdminKeyOpt = Annotated[str | None, typer.Option("--admin-key", help="Admin key (default: $UNDERSTUDY_ADMIN_KEY)")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Model name (default: the first of /v1/models)")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Tokens to generate (default: the server's)")]
TemperatureOpt = Annotated[float | None, typer.Option("--temperature", help="0 = greedy (default: the server's)")]
NoStreamOpt = Annotated[bool, typer.Option("--no-stream", help="Wait for the whole answer instead of streaming")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print the drafter version and usage to stderr")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the server's JSON")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the server")]


def _client(server: str, api_key: str | None = None, admin_key: str | None = None,
            timeout: float = 120.0) -> UnderstudyClient:
    from understudy.clients.client import UnderstudyClient

    return UnderstudyClient(server, api_key=api_key, admin_key=admin_key, timeout=timeout)


def _params(max_tokens: int | None, temperature: float | None, stream_usage: bool) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if max_tokens is not None:
        p["max_tokens"] = max_tokens
    if temperature is not None:
        p["temperature"] = temperature
    if stream_usage:
        p["stream_options"] = {"include_usage": True}
    return p


def _read_arg(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def _print_stream(stream: Any, piece: Any, verbose: bool) -> None:
    """Write each chunk's text as it arrives; with -v, the drafter version first and usage last (stderr)."""
    finish, usage, first = None, None, True
    for chunk in stream:
        if first and verbose:
            typer.echo(f"[drafter version {stream.drafter_version}]", err=True)
        first = False
        for choice in chunk.get("choices") or []:
            sys.stdout.write(piece(choice))
            finish = choice.get("finish_reason") or finish
        sys.stdout.flush()
        usage = chunk.get("usage") or usage
    sys.stdout.write("\n")
    if verbose:
        typer.echo(f"[finish_reason {finish}, usage {json.dumps(usage)}]", err=True)


def _print_whole(resp: Any, text: str, verbose: bool, as_json: bool) -> None:
    if verbose:
        typer.echo(f"[drafter version {resp.drafter_version}]", err=True)
    typer.echo(json.dumps(resp, indent=2) if as_json else text)
    if verbose:
        finish = (resp.get("choices") or [{}])[0].get("finish_reason")
        typer.echo(f"[finish_reason {finish}, usage {json.dumps(resp.get('usage'))}]", err=True)


def chat_cmd(
    message: Annotated[str, typer.Argument(help="The user message ('-' reads it from stdin)")],
    server: ServerOpt = DEFAULT_SERVER, api_key: ApiKeyOpt = None, model: ModelOpt = None,
    max_tokens: MaxTokensOpt = None, temperature: TemperatureOpt = None,
    system: Annotated[str | None, typer.Option("--system", help="A system message sent first")] = None,
    no_stream: NoStreamOpt = False, verbose: VerboseOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --no-stream: print the whole JSON response")] = False,
    timeout: TimeoutOpt = 120.0,
) -> None:
    """Send one chat message to a running server and print the answer (streamed by default)."""
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": _read_arg(message)}]
    with _client(server, api_key, timeout=timeout) as c:
        if no_stream:
            r = c.chat(messages, model=model, **_params(max_tokens, temperature, False))
            _print_whole(r, r["choices"][0]["message"]["content"], verbose, as_json)
            return
        stream = c.chat_stream(messages, model=model, **_params(max_tokens, temperature, verbose))
        _print_stream(stream, lambda ch: (ch.get("delta") or {}).get("content") or "", verbose)


def complete_cmd(
    prompt: Annotated[str, typer.Argument(help="The raw prompt, no chat template ('-' reads it from stdin)")],
    server: ServerOpt = DEFAULT_SERVER, api_key: ApiKeyOpt = None, model: ModelOpt = None,
    max_tokens: MaxTokensOpt = None, temperature: TemperatureOpt = None,
    no_stream: NoStreamOpt = False, verbose: VerboseOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --no-stream: print the whole JSON response")] = False,
    timeout: TimeoutOpt = 120.0,
) -> None:
    """Complete a raw prompt on a running server (/v1/completions) and print the continuation."""
    with _client(server, api_key, timeout=timeout) as c:
        if no_stream:
            r = c.complete(_read_arg(prompt), model=model, **_params(max_tokens, temperature, False))
            _print_whole(r, r["choices"][0]["text"], verbose, as_json)
            return
        stream = c.complete_stream(_read_arg(prompt), model=model, **_params(max_tokens, temperature, verbose))
        _print_stream(stream, lambda ch: ch.get("text") or "", verbose)


# ---- live-server drafter commands (admin API) ------------------------------------------------------------------
def _label(v: Any) -> str:
    return "-" if v is None else str(v)


def echo_state(state: dict[str, Any], as_json: bool, history: int = 0) -> None:
    if as_json:
        typer.echo(json.dumps(state, indent=2, default=str))
        return
    typer.echo(f"serving drafter {_label(state.get('version'))} (following: {_label(state.get('following'))}, "
               f"pinned: {_label(state.get('pinned'))}, previous: {_label(state.get('previous'))})")
    if state.get("rejected"):
        typer.echo(f"  rejected by the canary: {', '.join(state['rejected'])}")
    recent = (state.get("history") or [])[-history:] if history else []
    if recent:
        typer.echo("  recent swaps (oldest first):")
    for h in recent:
        stall = f", stall {h['stall_s']} s" if h.get("stall_s") is not None else ""
        typer.echo(f"    {_label(h.get('from_version'))} -> {_label(h.get('to_version'))}: {h.get('result')}"
                   f" ({h.get('reason')}{stall})")


def server_current(server: str, admin_key: str | None, as_json: bool) -> None:
    with _client(server, admin_key=admin_key) as c:
        echo_state(c.current_drafter(), as_json, history=5)


def server_rollback(server: str, admin_key: str | None, as_json: bool) -> None:
    with _client(server, admin_key=admin_key) as c:
        echo_state(c.rollback(), as_json)


def server_list(server: str, admin_key: str | None, as_json: bool) -> None:
    with _client(server, admin_key=admin_key) as c:
        body = c.drafters()
    if as_json:
        typer.echo(json.dumps(body, indent=2, default=str))
        return
    names: dict[int, list[str]] = {}
    for name, v in sorted((body.get("aliases") or {}).items()):
        names.setdefault(v, []).append(name)
    typer.echo(f"server registry {body.get('registry')}: {len(body.get('versions') or [])} version(s)")
    for v in body.get("versions") or []:
        ok = "compatible" if v.get("compatible") else "INCOMPATIBLE"
        typer.echo(f"  {v.get('version')}  {ok}  {','.join(names.get(v.get('version'), [])) or '-'}")


def _version_arg(spec: str) -> int | str:
    return int(spec) if spec.isdigit() else spec


ServerReqOpt = Annotated[str, typer.Option("--server", envvar="UNDERSTUDY_SERVER",
                                           help="The live server's URL (its admin API)")]


def current_cmd(server: ServerReqOpt, admin_key: AdminKeyOpt = None, as_json: JsonOpt = False) -> None:
    """Show the drafter a live server is serving (and what it follows or is pinned to)."""
    server_current(server, admin_key, as_json)


def pin_cmd(version: Annotated[str, typer.Argument(help="Version (7, v7) or alias, resolved once")],
            server: ServerReqOpt, admin_key: AdminKeyOpt = None, as_json: JsonOpt = False) -> None:
    """Pin a live server to one drafter version (it stops following its alias)."""
    with _client(server, admin_key=admin_key) as c:
        echo_state(c.pin(_version_arg(version)), as_json)


def follow_cmd(alias: Annotated[str, typer.Argument(help="Registry alias to follow (latest, best, serving)")],
               server: ServerReqOpt, admin_key: AdminKeyOpt = None, as_json: JsonOpt = False) -> None:
    """Make a live server follow a registry alias (it swaps whenever the alias moves)."""
    with _client(server, admin_key=admin_key) as c:
        echo_state(c.follow(alias), as_json)


def echo_controller(state: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(state, indent=2, default=str))
        return
    pinned = state.get("pinned_k")
    how = "controller chooses" if pinned is None else ("off (pinned K=0)" if pinned == 0 else f"pinned at K={pinned}")
    typer.echo(f"speculation: {how}; controller {state.get('kind')}"
               + (f", arms {state['arms']}" if state.get("arms") else f", K {state.get('k')}"))
    for bucket, b in (state.get("buckets") or {}).items():
        typer.echo(f"  batch {bucket}: K={b.get('current_k')}, pulls {b.get('pulls')}, "
                   f"tokens/s {b.get('tokens_per_s')}")


def speculation_cmd(
    setting: Annotated[str | None, typer.Argument(
        help="off (K=0), auto (the controller chooses), or a K to pin; omit to show the state")] = None,
    server: ServerOpt = DEFAULT_SERVER, admin_key: AdminKeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Show or set a live server's speculation: `off` measures the no-speculation baseline on the same server and
    pair, `auto` hands K back to the adaptive controller, `N` pins K=N (native backend)."""
    k: int | None
    if setting is None:
        with _client(server, admin_key=admin_key) as c:
            echo_controller(c.controller(), as_json)
        return
    if setting == "off":
        k = 0
    elif setting == "auto":
        k = None
    elif setting.isdigit():
        k = int(setting)
    else:
        raise typer.BadParameter(f"{setting!r}: say off, auto or a number of draft tokens (0, 1, 2, ...)",
                                 param_hint="SETTING")
    with _client(server, admin_key=admin_key) as c:
        echo_controller(c.pin_speculation(k), as_json)


def register(app: typer.Typer, drafters_app: typer.Typer) -> None:
    """Add `chat`, `complete` and `speculation` to the top-level app and `current`/`pin`/`follow` to
    `understudy drafters`."""
    app.command("chat")(chat_cmd)
    app.command("complete")(complete_cmd)
    app.command("speculation")(speculation_cmd)
    drafters_app.command("current")(current_cmd)
    drafters_app.command("pin")(pin_cmd)
    drafters_app.command("follow")(follow_cmd)
