"""`fleet`: the operator CLI. Each command parses, calls `FleetClient`, renders (tables, or `--json` for scripts).

Theory: the CLI holds no logic of the fleet; it is a thin client of the REST API (docs/internals.md). Errors are
typed in `errors.py`, raised by `config.py` and `client.py`, and mapped to one stderr line and an exit code in one
place, `_Cli.invoke` below, which wraps every command of the tree:

    0 ok    1 unexpected    2 usage, config or a request the cloud refused (404/409/413/422)
    3 cloud unreachable    4 not authorised (401/403)    5 the cloud failed (5xx) or answered nonsense
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from typer.core import TyperGroup

from edgefleet.fleet import commands_distill, commands_efficiency, commands_provenance, render
from edgefleet.fleet import config as cfg
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.errors import CloudUnreachable, ConfigError, FleetError
from edgefleet.protos.api import DeployRequest, EnrollmentTokenRequest

# 1 MiB: below this an upload finishes before a bar could draw a frame; above it a slow link shows progress.
PROGRESS_MIN_BYTES = 1024 * 1024


class _Cli(TyperGroup):
    """The root group: the one place where errors become a line on stderr and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except FleetError as exc:
            _fail(exc.message, exc.exit_code)
        except ValidationError as exc:  # a request body the protos models refuse (e.g. DeployRequest)
            first = exc.errors()[0]
            _fail(f"invalid request: {first.get('msg')}", 2)


def _examples(*lines: str) -> str:
    # Typer's rich help joins single newlines; a blank line between examples keeps one per line.
    return "Examples:\n\n" + "\n\n".join(f"$ {line}" for line in lines)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


app = typer.Typer(
    cls=_Cli,
    name="fleet",
    help="Operate an edgefleet: devices, device classes, models, deployments and their status.",
    epilog=_examples("fleet login --url http://CLOUD:8080 --token ADMIN_TOKEN", "fleet status",
                     "fleet models push model.onnx --name digits && fleet deploy digits --class rpi4"),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
devices_app = typer.Typer(help="Enrolled devices. Alone, `fleet devices` lists them.")
classes_app = typer.Typer(help="Device classes (the hardware catalog). Alone, `fleet classes` lists them.")
models_app = typer.Typer(help="Model versions in the registry. Alone, `fleet models` lists them.")
deployments_app = typer.Typer(help="Past deployments. Alone, `fleet deployments` lists them.")
tokens_app = typer.Typer(help="Bearer tokens: enrollment tokens for new devices; list, revoke and expire any.",
                         no_args_is_help=True)
app.add_typer(devices_app, name="devices")
app.add_typer(classes_app, name="classes")
app.add_typer(models_app, name="models")
app.add_typer(deployments_app, name="deployments")
app.add_typer(tokens_app, name="tokens")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON view instead of a table.")]


@dataclass
class _Globals:
    url: str | None
    token: str | None


@app.callback()
def _root(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option("--url", help="Cloud URL; overrides EDGEFLEET_URL and cli.toml.",
                                               metavar="URL")] = None,
    token: Annotated[str | None, typer.Option("--token", help="Admin token; overrides EDGEFLEET_TOKEN and "
                                                 "cli.toml.", metavar="TOKEN")] = None,
) -> None:
    ctx.obj = _Globals(url, token)


def _client(ctx: typer.Context) -> FleetClient:
    g: _Globals = ctx.find_root().obj
    conf = cfg.resolve(url=g.url, token=g.token)
    if not conf.token:
        raise ConfigError(f"no token configured: {cfg.LOGIN_HINT}, set {cfg.ENV_TOKEN}, or pass --token")
    return ctx.with_resource(FleetClient(conf.url, conf.token, timeout_s=conf.timeout_s))


def _out() -> Console:
    return Console()


def _emit(as_json: bool, value: Any, table: Any) -> None:
    if as_json:
        typer.echo(render.to_json(value))
    else:
        _out().print(table)


# -- login -------------------------------------------------------------------------------------------------------


@app.command(epilog=_examples("fleet login --url http://cloud.local:8080 --token $(cat /var/lib/edgefleet/admin.token)",
                          "fleet login --url http://10.0.0.5:8080 --token TOKEN --no-verify"))
def login(
    ctx: typer.Context,
    url: Annotated[str, typer.Option("--url", help="The cloud's URL.", metavar="URL")],
    token: Annotated[str, typer.Option("--token", help="An admin token (data_dir/admin.token on the cloud).",
                                       metavar="TOKEN")],
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check URL and token against the cloud "
                                         "before saving.")] = True,
) -> None:
    """Save the cloud URL and admin token to ~/.config/edgefleet/cli.toml (mode 0600)."""
    url = cfg.check_url(url, "--url")
    if verify:
        with FleetClient(url, token, timeout_s=10.0) as client:
            try:
                client.stats()  # an admin-only endpoint: proves both the URL and the token
            except CloudUnreachable as exc:
                raise CloudUnreachable(f"{exc.message}; or pass --no-verify to save anyway") from None
    path = cfg.save(url, token)
    typer.echo(f"saved {url} to {path}" + ("" if verify else " (not verified)"))
    if verify:  # the same trust step pins the key provenance is checked with (fleet/commands_provenance.py)
        commands_provenance.pin_at_login(url, token)


# -- devices -----------------------------------------------------------------------------------------------------


@devices_app.command("list", epilog=_examples("fleet devices list", "fleet devices list --json | jq '.[].device_id'"))
def devices_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List enrolled devices: class, labels, online, last seen, desired against reported."""
    devices = _client(ctx).list_devices()
    _emit(as_json, devices, render.devices_table(devices))


@devices_app.command("show", epilog=_examples("fleet devices show kitchen-pi", "fleet devices show kitchen-pi --json"))
def devices_show(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device id.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one device: facts, models (desired, active, failed and why) and latest telemetry."""
    device = _client(ctx).get_device(device_id)
    _emit(as_json, device, render.device_detail(device))


@devices_app.command("reset", epilog=_examples("fleet devices reset kitchen-pi"))
def devices_reset(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device id.")],
    as_json: JsonOpt = False,
) -> None:
    """Let a reinstalled device enroll again (a wiped SD card, a replaced board).

    An enrolled id is re-enrolled only by the agent holding the device key it registered; a reinstalled agent has
    a new key, so it is refused until this reset. The reset also revokes the device's token and broker login at
    once; deployments, generation and telemetry stay. Then restart the agent on the device.
    """
    device = _client(ctx).reset_device(device_id)
    if as_json:
        typer.echo(render.to_json(device))
    else:
        typer.echo(f"{device.device_id}: reset; its next enrollment registers a new device key "
                   "(restart the agent on the device)")


# -- classes -----------------------------------------------------------------------------------------------------


@classes_app.command("list", epilog=_examples("fleet classes list", "fleet classes list --json"))
def classes_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List device classes: hardware, runtimes, power figures and default budgets."""
    classes = _client(ctx).list_classes()
    _emit(as_json, classes, render.classes_table(classes))


# -- models ------------------------------------------------------------------------------------------------------


@models_app.command("push", epilog=_examples("fleet models push model.onnx --name digits",
                                             "fleet models push model.onnx --name digits --json | jq .version"))
def models_push(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(metavar="FILE", help="An ONNX model file.", exists=True, dir_okay=False,
                                         readable=True)],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name (a-z 0-9 . _ -); each push adds a version.")],
    as_json: JsonOpt = False,
) -> None:
    """Upload an ONNX model; the cloud validates it and answers with the new version."""
    client = _client(ctx)
    size = file.stat().st_size
    err = Console(stderr=True)
    if size < PROGRESS_MIN_BYTES or not err.is_terminal:  # no bar in logs and pipes: it would only add noise
        view = client.push_model(name, file)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task(f"uploading {file.name}", total=size)

            def progress(sent: int, total: int) -> None:
                bar.update(task, completed=sent,
                           description="validating in the cloud" if sent >= total else f"uploading {file.name}")

            view = client.push_model(name, file, on_progress=progress)
    if as_json:
        typer.echo(render.to_json(view))
    else:
        _out().print(f"pushed [bold]{view.name} v{view.version}[/] ({view.size_bytes} bytes, sha256 "
                     f"{view.sha256[:12]})")
        _out().print(render.models_table([view]))


@models_app.command("list", epilog=_examples("fleet models list", "fleet models list --json"))
def models_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List model versions with their inputs, outputs, opset and hash."""
    models = _client(ctx).list_models()
    _emit(as_json, models, render.models_table(models))


@models_app.command("show", epilog=_examples("fleet models show digits", "fleet models show digits --version 2 --json"))
def models_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[int | None, typer.Option("--version", min=1, help="Model version (default: latest).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one model version: size, hash, opset, and its signature (inputs and outputs with full shapes)."""
    client = _client(ctx)
    versions = client.model_versions(name)
    view = client.get_model(name, version) if version is not None else versions[-1]
    _emit(as_json, view, render.model_detail(view, versions))


@models_app.command("pull", epilog=_examples("fleet models pull digits --version 2 -o digits.onnx",
                                             "fleet models pull digits --version 3 --class rpi4 -o digits-rpi4.tflite"))
def models_pull(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[int | None, typer.Option("--version", min=1, help="Model version (default: latest).")] = None,
    device_class: Annotated[str | None, typer.Option("--class", metavar="NAME", help="The model file this class "
                                                     "runs (ONNX or TFLite), from its bundle.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", dir_okay=False,
                                                help="Where to write it (default: the cloud's file name, e.g. "
                                                "digits-v2.onnx, in the current folder).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a model version: the uploaded ONNX file, or with --class the variant that class runs.

    The file is written only once its sha256 matches the cloud's; an existing FILE is replaced.
    """
    client = _client(ctx)
    if version is None:
        version = client.model_versions(name)[-1].version
    err = Console(stderr=True)
    if not err.is_terminal:  # no bar in logs and pipes
        pulled = client.pull_model(name, version, output, device_class=device_class)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task(f"downloading {name} v{version}", total=None, visible=False)

            def progress(got: int, total: int) -> None:
                # Shown only for large files: a small one is done before a bar could draw a frame.
                bar.update(task, completed=got, total=total, visible=total >= PROGRESS_MIN_BYTES)

            pulled = client.pull_model(name, version, output, device_class=device_class, on_progress=progress)
    if as_json:
        typer.echo(json.dumps({"path": str(pulled.path), "size_bytes": pulled.size_bytes, "sha256": pulled.sha256,
                               "model": name, "version": version, "device_class": device_class}, indent=2))
    else:
        typer.echo(f"wrote {pulled.path} ({pulled.size_bytes} bytes, sha256 {pulled.sha256[:12]}): {name} v{version}"
                   + (f" as class {device_class} runs it" if device_class else ""))


# -- deploy ------------------------------------------------------------------------------------------------------


@app.command(epilog=_examples("fleet deploy digits --class rpi4", "fleet deploy digits --version 2 --device kitchen-pi",
                            "fleet deploy digits --label site=lab --json"))
def deploy(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model name.")],
    version: Annotated[int | None, typer.Option("--version", min=1, help="Model version (default: latest).")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar="ID", help="Target one device.")] = None,
    device_class: Annotated[str | None, typer.Option("--class", metavar="NAME", help="Target a device class.")]
    = None,
    label: Annotated[str | None, typer.Option("--label", metavar="KEY=VALUE", help="Target labelled devices.")]
    = None,
    p95_ms: Annotated[float | None, typer.Option(
        "--p95-ms", min=0.001, help="Latency budget (p95, ms per request) the devices' offload policy keeps; default: "
        "the class's (`fleet classes show NAME`).")] = None,
    mj_per_inference: Annotated[float | None, typer.Option(
        "--mj-per-inference", min=0.001, help="Energy budget (mJ per inference) the offload policy keeps; default: the "
        "class's.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Deploy a model version to exactly one target: --device, --class or --label.

    A label or class that no enrolled device has yet is not an error: the rule is kept for the devices that enroll
    later, and a warning on stderr says that none is reached now. --p95-ms and --mj-per-inference set the budgets the
    agents' offload policy keeps for this model (over the class's): a device that cannot keep them sends work to the
    cloud.
    """
    given = [flag for flag, v in (("--device", device), ("--class", device_class), ("--label", label)) if v]
    if len(given) != 1:
        raise typer.BadParameter(
            "give exactly one target: --device ID, --class NAME or --label KEY=VALUE"
            + (f" (got {' and '.join(given)})" if given else ""), ctx=ctx, param_hint="target")
    if label and "=" not in label:
        raise typer.BadParameter("must be KEY=VALUE, e.g. site=kitchen", ctx=ctx, param_hint="--label")
    request = DeployRequest(model=model, version=version, device_id=device, device_class=device_class, label=label,
                            p95_ms=p95_ms, mj_per_inference=mj_per_inference)
    view = _client(ctx).deploy(request)
    if not view.devices and view.target_kind != "device":
        # Not an error: the rule is kept and reaches the devices that enroll (or are labelled) later.
        which = f"labelled {label}" if label else f"of class {device_class}"
        typer.echo(f"warning: no enrolled device is {which}: deployment {view.id} reaches none now, and applies to "
                   "devices that enroll later; `fleet devices` lists the enrolled ones", err=True)
    _emit(as_json, view, render.deployment_summary(view))


@deployments_app.command("list", epilog=_examples("fleet deployments list", "fleet deployments list --json"))
def deployments_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List deployments, newest last."""
    views = _client(ctx).list_deployments()
    _emit(as_json, views, render.deployments_table(views))


# -- status, stats, tokens ---------------------------------------------------------------------------------------


@app.command(epilog=_examples("fleet status", "fleet status --json | jq '.[] | select(.state==\"failed\")'"))
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Per device and model: class, desired against active version, state, last seen, p50/p95 ms per request, ms and
    mJ per inference and inferences per kWh (a batched request is one inference per row)."""
    rows = _client(ctx).status()
    _emit(as_json, rows, render.status_table(rows))


@app.command(epilog=_examples("fleet stats", "fleet stats --json"))
def stats(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The cloud's counters (malformed messages, refused documents and the like) and the fleet's efficiency over
    the look-back: inferences, offloaded, energy, cost."""
    view = _client(ctx).stats()
    _emit(as_json, view, render.stats_table(view))


_TTL_RE = re.compile(r"^(\d+)([smhd]?)$")
_TTL_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl_s(value: str, hint: str = "--ttl") -> int:
    m = _TTL_RE.match(value.strip())
    if not m or int(m.group(1)) == 0:
        raise typer.BadParameter("use a positive number with an optional unit s, m, h or d, e.g. 12h or 7d",
                                 param_hint=hint)
    return int(m.group(1)) * _TTL_UNIT_S[m.group(2)]


@tokens_app.command("create", epilog=_examples("fleet tokens create --note 'lab pis' --ttl 2d",
                                              "TOKEN=$(fleet tokens create --json | jq -r .token)"))
def tokens_create(
    ctx: typer.Context,
    note: Annotated[str, typer.Option("--note", help="Why the token exists; kept with it.")] = "",
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime: seconds or with a unit (30m, 12h, 7d).")] = "7d",
    as_json: JsonOpt = False,
) -> None:
    """Create an enrollment token: a device presents it once to enroll (shown once)."""
    view = _client(ctx).create_enrollment_token(EnrollmentTokenRequest(note=note, ttl_s=_ttl_s(ttl)))
    _emit(as_json, view, render.token_panel(view))


@tokens_app.command("list", epilog=_examples("fleet tokens list", "fleet tokens list --kind device --json"))
def tokens_list(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Option("--kind", help="Only this kind: admin, enroll or device.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List bearer tokens: id, kind, device, note and expiry (never the token itself)."""
    if kind is not None and kind not in ("admin", "enroll", "device"):
        raise typer.BadParameter("use admin, enroll or device", param_hint="--kind")
    tokens = _client(ctx).list_tokens(kind)
    _emit(as_json, tokens, render.tokens_table(tokens))


@tokens_app.command("revoke", epilog=_examples("fleet tokens revoke 12"))
def tokens_revoke(
    ctx: typer.Context,
    token_id: Annotated[int, typer.Argument(metavar="ID", help="The token's id (fleet tokens list).", min=1)],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token at once. A device token takes the device's broker login with it: the device is cut off until
    it is reset (`fleet devices reset`) and enrolls again."""
    view = _client(ctx).revoke_token(token_id)
    if as_json:
        typer.echo(render.to_json(view))
    else:
        typer.echo(f"revoked {view.kind} token {view.id}" + (f" of {view.device_id}" if view.device_id else ""))


@tokens_app.command("expire", epilog=_examples("fleet tokens expire 12 --in 1h"))
def tokens_expire(
    ctx: typer.Context,
    token_id: Annotated[int, typer.Argument(metavar="ID", help="The token's id (fleet tokens list).", min=1)],
    ttl: Annotated[str, typer.Option("--in", help="Stops working after this long: 30m, 12h, 7d.")] = "1h",
    as_json: JsonOpt = False,
) -> None:
    """Give an enrollment or device token an expiry, from now."""
    view = _client(ctx).expire_token(token_id, _ttl_s(ttl, "--in"))
    _emit(as_json, view, render.tokens_table([view]))


# `fleet devices` alone lists, like `fleet devices list`: the cloud's own hints say "`fleet devices` lists ...".
def _list_by_default(group: typer.Typer, lister: Any) -> None:
    @group.callback(invoke_without_command=True)
    def _default(ctx: typer.Context, as_json: JsonOpt = False) -> None:
        if ctx.invoked_subcommand is None:
            lister(ctx, as_json)


_list_by_default(devices_app, devices_list)
_list_by_default(classes_app, classes_list)
_list_by_default(models_app, models_list)
_list_by_default(deployments_app, deployments_list)

# `fleet distill`, `fleet jobs ...`, `fleet classes show|refit` (fleet/commands_distill.py).
commands_distill.register(app, classes_app)
# `fleet models provenance` (fleet/commands_provenance.py).
commands_provenance.register(models_app)
# `fleet efficiency MODEL` (fleet/commands_efficiency.py).
commands_efficiency.register(app)


def main() -> None:
    app(prog_name="fleet")


if __name__ == "__main__":
    main()
