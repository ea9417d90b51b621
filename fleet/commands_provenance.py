"""`fleet models provenance`: verify how a version's bundles were made, offline, and print the chain; and the key pin
that `fleet login` makes.

Theory: like every command, it parses, calls `FleetClient`, renders. It fetches the version's envelopes, downloads
each bundle through the TUF targets route (the bytes devices get), and has `fleet/provenance.py` verify them against
the pinned key (`--key FILE`, else the one `fleet login` pinned; never one taken from the answer). The chain prints
as a tree, source model -> teacher -> student -> quantised variant -> bundle, or with `--json` as the verified
statements. A statement that was changed, a key that is not the pinned one, or a bundle whose digest does not match
is an `Unverified` error: one line and exit 2, through the CLI's one error mapping.

Registered into the `models` group by fleet/main.py; `_client` is looked up there at call time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.errors import FleetError, Rejected
from edgefleet.fleet.provenance import (
    VerifiedBundle,
    load_key_file,
    load_pinned,
    pinned_path,
    save_pinned,
    verify_bundle,
)
from edgefleet.protos.provenance import ProvenancePredicate

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the verified statements as JSON instead of a tree.")]


def _client(ctx: typer.Context) -> FleetClient:
    from edgefleet.fleet.main import _client as client

    return client(ctx)


def _examples(*lines: str) -> str:
    return "Examples:\n\n" + "\n\n".join(f"$ {line}" for line in lines)


# -- login -------------------------------------------------------------------------------------------------------


def pin_at_login(url: str, token: str, timeout_s: float = 10.0) -> None:
    """Fetch the cloud's provenance key and pin it; a cloud without one only gets a note (login still succeeds)."""
    try:
        with FleetClient(url, token, timeout_s=timeout_s) as client:
            keys = client.provenance_keys().keys
    except FleetError as exc:
        typer.echo(f"note: no provenance key pinned ({exc.message}); `fleet models provenance` needs --key FILE",
                   err=True)
        return
    if not keys:
        typer.echo("note: the cloud serves no provenance key; `fleet models provenance` needs --key FILE", err=True)
        return
    try:
        before = {k.keyid for k in load_pinned(url)}
    except FleetError:
        before = set()
    path = save_pinned(url, keys)
    now = {k.keyid for k in keys}
    replaced = f" (replacing {', '.join(sorted(k[:12] for k in before))})" if before and before != now else ""
    typer.echo(f"pinned provenance key {', '.join(sorted(k[:12] for k in now))} to {path}{replaced}")


# -- the command -------------------------------------------------------------------------------------------------


def models_provenance(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[int | None, typer.Option("--version", min=1, help="Model version (default: latest).")] = None,
    device_class: Annotated[str | None, typer.Option("--class", metavar="NAME", help="Only this class's bundle "
                                                     "(built first if no deployment has built it).")] = None,
    key: Annotated[Path | None, typer.Option("--key", metavar="FILE", help="Verify with this public key (PEM, or "
                                             "the keys route's JSON) instead of the one `fleet login` pinned.",
                                             exists=True, dir_okay=False, readable=True)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify the signed provenance of a version's bundles offline and print the chain: source model, teacher,
    student, quantised variant, bundle."""
    client = _client(ctx)
    keys = load_key_file(key) if key is not None else load_pinned(client.url, pinned_path())
    if version is None:
        versions = [m.version for m in client.list_models() if m.name == name]
        if not versions:
            raise Rejected(f"no model {name!r}; `fleet models` lists the models")
        version = max(versions)
    verified = [verify_bundle(view, client.download_target(view.target_path), keys,
                              asked=(name, version, device_class))
                for view in client.provenance(name, version, device_class)]
    if as_json:
        typer.echo(json.dumps([v.model_dump(mode="json") for v in verified], indent=2))
        return
    out = Console()
    for v in verified:
        out.print(chain_tree(v))


# -- rendering ---------------------------------------------------------------------------------------------------


def _sha(value: str | None) -> str:
    return f"sha256 {value[:16]}" if value else "sha256 not recorded"


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f", {n / size:.1f} {unit}"
    return f", {n} B"


_SETTING_WORDS = {"format": "{}", "per_channel": "per-channel", "activation_type": "activations {}",
                  "weight_type": "weights {}", "calibrate_method": "{} calibration", "keep_io_types": "float32 io",
                  "quant_type": "{}", "integer": "{} integer", "io": "{} io"}


def _settings(settings: dict[str, Any]) -> str:
    words = []
    for k, v in settings.items():
        if k in _SETTING_WORDS and v not in (False, None):
            words.append(_SETTING_WORDS[k].format(v))
    return ", ".join(words)


def chain_tree(v: VerifiedBundle) -> Tree:
    p: ProvenancePredicate = v.predicate
    root = Tree(f"[bold]{escape(v.model)} v{v.version}[/] for [bold]{escape(v.device_class)}[/]: provenance "
                f"[green]verified[/] (key {v.keyid[:12]})")
    src = p.source
    if src.role == "pushed":
        node = root.add(f"source model: {escape(src.name or '?')} v{src.version} (pushed), {_sha(src.sha256)}"
                        f"{_size(src.size_bytes)}")
    else:
        named = f"{escape(src.name)} v{src.version}" if src.name else "uploaded with the job"
        node = root.add(f"source model (teacher): {named}, {_sha(src.sha256)}{_size(src.size_bytes)}")
    d = p.distillation
    if d is not None:
        st = d.student
        label = "student: not recorded"
        if st is not None and st.family == "teacher":
            label = ("no student: the teacher's own variant shipped (no student was as good for less), fp32 "
                     f"{_sha(st.sha256)}")
        elif st is not None:
            label = (f"student: {escape(st.candidate)} ({st.family}, width x{st.width_mult}, depth {st.depth}), "
                     f"{st.epochs} epochs (best {st.best_epoch}), fp32 {_sha(st.sha256)}")
        node = node.add(label)
        spec = d.spec
        ts = d.transfer_set
        data = f"transfer set {_sha(ts.sha256)} ({ts.samples} rows)" if ts else "transfer set not recorded"
        node.add(f"distilled by job {d.job_id}: {data}, seed {spec.get('seed')}, temperature "
                 f"{spec.get('temperature')}, alpha {spec.get('alpha')}, max {spec.get('max_epochs')} epochs")
    if d is not None or p.quantization is not None or src.sha256 != p.model.sha256:
        m = p.model
        node = node.add(f"variant: {escape(m.name)} v{m.version}, {m.precision} for {m.runtime} ({m.format}), "
                        f"{_sha(m.sha256)}{_size(m.size_bytes)}")
        q = p.quantization
        if q is not None:
            rows = f", calibrated on {q.calibration_rows} rows" if q.calibration_rows else ""
            node.add(f"quantised to {q.precision} with {q.tool}: {_settings(q.settings)}{rows}")
    t = p.target
    bundle = node.add(f"bundle: {escape(t.target_path)}, {_sha(v.bundle_sha256)}, class {escape(t.device_class)} "
                      f"({t.runtime}; {', '.join(t.execution_providers) or '-'})")
    bundle.add(f"built by edgefleet {escape(p.builder.version)}, {p.built_at:%Y-%m-%d %H:%M:%S} UTC")
    return root


def register(models_app: typer.Typer) -> None:
    models_app.command("provenance", epilog=_examples(
        "fleet models provenance digits --version 3", "fleet models provenance digits --class rpi4 --json",
        "fleet models provenance digits --key provenance.pub.pem"))(models_provenance)


__all__ = ["chain_tree", "models_provenance", "pin_at_login", "register"]
