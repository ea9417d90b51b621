"""`edgefleet-cloud keys`: rotate the cloud's signing keys, and keep the TUF root key offline.

Theory: each command opens the data dir's TUF repository and desired-state signer directly (no running cloud is
needed, and one may run: both hold an flock while changing and `serve` reloads what changed, see
`cloud/trust/repository.py` and `cloud/trust/desired.py`). `sign-root` and `new-key` touch no data dir at all:
they run on the machine that keeps the root key. Errors are `CloudError`s, printed in one line, exit status 2.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from edgefleet.cloud.errors import CloudError

if TYPE_CHECKING:
    from edgefleet.cloud.settings import Settings
    from edgefleet.cloud.trust import DesiredStateSigner, TufRepository

keys_app = typer.Typer(
    help="Signing keys: rotate the TUF role keys and the desired-state key; keep the TUF root key offline "
         "(export-root on the cloud, sign-root where the root key is, import-root on the cloud).",
    no_args_is_help=True, add_completion=False)


class Role(str, Enum):
    root = "root"
    targets = "targets"
    snapshot = "snapshot"
    timestamp = "timestamp"
    desired = "desired"


class OnlineRole(str, Enum):
    targets = "targets"
    snapshot = "snapshot"
    timestamp = "timestamp"


DataDir = typer.Option(None, "--data-dir", help="The cloud's data dir (as given to `serve`).")
Config = typer.Option(None, "--config", help="TOML settings file (or EDGEFLEET_CONFIG).")


def _settings(data_dir: Path | None, config: Path | None) -> Settings:
    from edgefleet.cloud.settings import Settings

    return Settings(config_file=config, **({"data_dir": data_dir} if data_dir else {}))


def _repo(settings: Settings) -> TufRepository:
    from edgefleet.cloud.trust import TufRepository

    return TufRepository(settings.tuf_dir, timestamp_expiry_s=settings.tuf_timestamp_expiry_s,
                         offline_root=settings.tuf_offline_root)


def _signer(settings: Settings) -> DesiredStateSigner:
    from edgefleet.cloud.trust import DesiredStateSigner

    return DesiredStateSigner(settings.keys_dir)


def _fail(exc: CloudError) -> typer.Exit:
    typer.echo(f"edgefleet-cloud: {exc.message}", err=True)
    return typer.Exit(2)


def _short(keyids: list[str]) -> str:
    return ", ".join(k[:12] for k in keyids) or "-"


@keys_app.command("status")
def status(data_dir: Path | None = DataDir, config: Path | None = Config,
           as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """Show each TUF role's keys, versions and expiry, where the root key is, and the desired-state keys."""
    from edgefleet.cloud.trust.rotation import root_summary

    try:
        settings = _settings(data_dir, config)
        summary = root_summary(_repo(settings), _signer(settings))
    except CloudError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    tuf, desired = summary["tuf"], summary["desired"]
    typer.echo(f"TUF root key: {'in the data dir' if tuf['root_online'] else 'offline'}")
    for role, keyids in tuf["keyids"].items():
        typer.echo(f"  {role:<10} v{tuf['versions'][role]:<5} keys {_short(keyids):<16} expires {tuf['expires'][role]}")
    typer.echo(f"desired-state keys v{desired['version']}: {_short(desired['keyids'])}; signing with "
               f"{_short(desired['signing'])}{'  (rotation under way: finish it)' if desired['rotating'] else ''}")
    if desired["revoked"]:
        typer.echo(f"  revoked: {_short(desired['revoked'])}")


ROTATE_HELP = (
    "Replace a signing key.\n\n"
    "A TUF role's key (root, targets, snapshot, timestamp) is replaced at once: a new root version lists the new key, "
    "signed by the current root key (and, for root, by the new one too); metadata is signed by the old and the new "
    "key until the new root is out, so agents follow without a refusal. This needs the root key in the data dir; "
    "with an offline root use export-root --rotate ROLE, sign-root and import-root.\n\n"
    "The desired-state key (desired) takes two steps. `rotate --role desired` makes a new key, announces it in a key "
    "list signed by the old key and the new one, which agents read through TUF, and signs desired states with both; "
    "`serve` re-signs every device's document within refresh_interval_s. `rotate --role desired --finish` then "
    "revokes the old key: an agent that sees a document signed by the new key alone looks up the key lists and "
    "refuses the old key from then on."
)


@keys_app.command("rotate", help=ROTATE_HELP)
def rotate(
    role: Role = typer.Option(..., "--role", help="root, targets, snapshot, timestamp (TUF) or desired."),
    finish: bool = typer.Option(False, "--finish", help="desired only: end the rotation, revoking the old key."),
    data_dir: Path | None = DataDir, config: Path | None = Config,
) -> None:
    try:
        settings = _settings(data_dir, config)
        repo = _repo(settings)
        if role is Role.desired:
            from edgefleet.cloud.trust.rotation import rotate_desired

            doc = rotate_desired(_signer(settings), repo, finish=finish).payload
            keys = _short([k["keyid"] for k in doc.keys])
            if finish:
                typer.echo(f"desired-state keys v{doc.version}: {keys} alone; revoked {_short(doc.revoked)}. "
                           "Desired states are signed by the new key only once `serve` re-signs them "
                           "(within refresh_interval_s).")
            else:
                typer.echo(f"desired-state keys v{doc.version}: {keys}; desired states are signed by both. When "
                           "`serve` has re-signed them (within refresh_interval_s), run "
                           "`edgefleet-cloud keys rotate --role desired --finish`.")
            return
        if finish:
            typer.echo("edgefleet-cloud: --finish is for --role desired only (a TUF key is replaced in one step)",
                       err=True)
            raise typer.Exit(2)
        keyid = repo.rotate_key(role.value)
    except CloudError as exc:
        raise _fail(exc) from None
    typer.echo(f"TUF {role.value} key is now {keyid[:12]} (root v{repo.versions['root']}); agents follow on their "
               "next TUF refresh")


@keys_app.command("export-root")
def export_root(
    file: Path = typer.Argument(..., help="Where to write the next root version (unsigned JSON)."),
    rotate: list[OnlineRole] = typer.Option([], "--rotate", help="Give this online role a new key (repeatable); "
                                                                 "it is kept staged until import-root."),
    root_key: list[Path] = typer.Option([], "--root-key", help="PEM public key of the new root's root key "
                                                               "(repeatable; `keys new-key` makes one). Default: "
                                                               "keep the current root keys."),
    root_threshold: int = typer.Option(1, "--root-threshold", help="How many --root-key keys must sign."),
    data_dir: Path | None = DataDir, config: Path | None = Config,
) -> None:
    """Write the next TUF root version, unsigned, to FILE: take it to where the root key is and run sign-root."""
    from edgefleet.cloud.trust.rotation import describe_root, load_root_file, read_public_key
    from edgefleet.common.fsutil import atomic_write_bytes

    try:
        keys = [read_public_key(p) for p in root_key] or None
        data = _repo(_settings(data_dir, config)).export_root(rotate=[r.value for r in rotate], root_keys=keys,
                                                              root_threshold=root_threshold)
        atomic_write_bytes(file, data)
        summary = describe_root(load_root_file(file))
    except CloudError as exc:
        raise _fail(exc) from None
    typer.echo(f"wrote root v{summary['version']} (expires {summary['expires']}) to {file}; sign it with "
               f"`edgefleet-cloud keys sign-root {file} --key ROOT.pem` (the current root key"
               f"{' and the new one' if root_key else ''}), then `edgefleet-cloud keys import-root {file}` here")


@keys_app.command("sign-root")
def sign_root(
    file: Path = typer.Argument(..., help="The root metadata export-root wrote; signed in place."),
    key: list[Path] = typer.Option(..., "--key", help="PEM private key to sign with (repeatable)."),
) -> None:
    """Sign a root version with private keys. Needs no data dir: run it on the machine that keeps the root key."""
    from edgefleet.cloud.trust.rotation import sign_root_file

    try:
        summary = sign_root_file(file, key)
    except CloudError as exc:
        raise _fail(exc) from None
    roles: dict[str, Any] = summary["roles"]
    typer.echo(f"root v{summary['version']} (expires {summary['expires']}) now signed by "
               f"{_short(summary['signed_by'])}")
    for role, info in roles.items():
        typer.echo(f"  {role:<10} keys {_short(info['keyids'])} threshold {info['threshold']}")


@keys_app.command("import-root")
def import_root(
    file: Path = typer.Argument(..., help="The signed root metadata."),
    data_dir: Path | None = DataDir, config: Path | None = Config,
) -> None:
    """Check that FILE is the next root, signed by the current root's threshold and its own, and publish it."""
    try:
        data = Path(file).read_bytes()
    except OSError as exc:
        typer.echo(f"edgefleet-cloud: cannot read {file}: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        version = _repo(_settings(data_dir, config)).import_root(data)
    except CloudError as exc:
        raise _fail(exc) from None
    typer.echo(f"TUF root v{version} published; agents follow on their next TUF refresh")


@keys_app.command("take-root-offline")
def take_root_offline(
    out: Path = typer.Option(..., "--out", help="Where to move the root key (a new file, e.g. on removable media)."),
    data_dir: Path | None = DataDir, config: Path | None = Config,
) -> None:
    """Move the TUF root private key out of the data dir; then set tuf_offline_root = true."""
    from edgefleet.cloud.trust.rotation import take_root_offline as move

    try:
        keyid = move(_repo(_settings(data_dir, config)), out)
    except CloudError as exc:
        raise _fail(exc) from None
    typer.echo(f"moved the TUF root key {keyid[:12]} to {out}; keep it off this machine, set tuf_offline_root = true "
               "(or EDGEFLEET_TUF_OFFLINE_ROOT=1), and use export-root / sign-root / import-root for new roots")


@keys_app.command("new-key")
def new_key(
    out: Path = typer.Argument(..., help="Where to write the new private key (PEM, 0600; must not exist)."),
    public_out: Path | None = typer.Option(None, "--public-out", help="Also write the public key (PEM) here."),
) -> None:
    """Make an ed25519 key, e.g. a new root key, on the machine that will keep it (no data dir needed)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    from edgefleet.common.fsutil import atomic_write_bytes

    signer = CryptoSigner.generate_ed25519()
    if not atomic_write_bytes(out, signer.private_bytes, 0o600, exclusive=True):
        typer.echo(f"edgefleet-cloud: {out} exists: give a new file name", err=True)
        raise typer.Exit(2)
    if public_out is not None:
        private = load_pem_private_key(signer.private_bytes, None)
        pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        atomic_write_bytes(public_out, pem)
    typer.echo(f"wrote key {signer.public_key.keyid[:12]} to {out}" + (f" and its public key to {public_out}"
                                                                       if public_out else ""))
