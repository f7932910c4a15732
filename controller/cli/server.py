"""server.py: ``nodemesh controller init|run`` — thin click shells over datadir.py and app.py."""
from __future__ import annotations

from pathlib import Path

import click
import trio

from controller import app, client, datadir


def _addr(value: str, default_port: int) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}") from None


data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="NODEMESH_DATA_DIR",
    default=datadir.DEFAULT_DATA_DIR, show_default=True, help="Where the store and CA live (env NODEMESH_DATA_DIR).")


@click.group()
def controller() -> None:
    """Initialise and run the controller (store, CA and API)."""


@controller.command()
@data_dir_option
@click.option("--trust-domain", default="cluster.local", show_default=True,
              help="SPIFFE trust domain of every identity this CA signs.")
@click.option("--san", "sans", multiple=True, metavar="NAME|IP",
              help="Extra DNS name or IP for the API's server certificate (repeatable). "
                   "localhost, 127.0.0.1, ::1 and the hostname are always included.")
@click.option("--ca-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="Use this CA certificate instead of creating a root (needs --ca-key).")
@click.option("--ca-key", type=click.Path(dir_okay=False, path_type=Path), help="The key of --ca-cert.")
@click.option("--ca-bundle", type=click.Path(dir_okay=False, path_type=Path),
              help="Root certificate(s) above --ca-cert when it is an intermediate.")
@click.option("--controller-url", default=None, metavar="URL",
              help="Address written to the client config [default: https://<first --san or 127.0.0.1>:15012].")
@click.option("--write-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Client config to write for the CLI [default: $NODEMESH_CONFIG or ~/.config/nodemesh/config.yaml].")
def init(data_dir, trust_domain, sans, ca_cert, ca_key, ca_bundle, controller_url, write_config):
    """Create the data dir, the mesh CA, the API certificate and an admin credential.

    Safe to run twice: an initialised data dir is left untouched.
    """
    d = datadir.DataDir(data_dir)
    names = tuple(dict.fromkeys((*sans, *datadir.default_server_names())))
    try:
        created = datadir.initialise(d, trust_domain=trust_domain, server_names=names,
                                     ca_cert=ca_cert, ca_key=ca_key, ca_bundle=ca_bundle)
    except datadir.DataDirError as e:
        raise click.ClickException(str(e)) from None
    settings = datadir.load_settings(d)
    url = controller_url or f"https://{_url_host(sans[0] if sans else '127.0.0.1')}:15012"
    config_path = write_config or client.default_config_path()
    client.write_config(config_path, client.Settings(url, d.bundle, d.admin_cert, d.admin_key))
    if created:
        click.echo(f"initialised {d.path} for trust domain {settings.trust_domain}")
        click.echo(f"  trust bundle: {d.bundle}")
        click.echo(f"  admin credential: {d.admin_cert}")
    else:
        click.echo(f"{d.path} is already initialised (trust domain {settings.trust_domain}); nothing changed")
    click.echo(f"client config: {config_path} (controller {url})")
    click.echo(f"next: nodemesh controller run --data-dir {d.path}")


@controller.command()
@data_dir_option
@click.option("--listen", default="0.0.0.0:15012", show_default=True, metavar="HOST:PORT",
              help="Address of the HTTPS API.")
@click.option("--metrics-listen", default="0.0.0.0:15014", show_default=True, metavar="HOST:PORT",
              help="Address of the Prometheus /metrics endpoint.")
def run(data_dir, listen, metrics_listen):
    """Serve the API and metrics until SIGTERM or Ctrl-C."""
    d = datadir.DataDir(data_dir)
    api_host, api_port = _addr(listen, 15012)
    m_host, m_port = _addr(metrics_listen, 15014)
    try:
        trio.run(lambda: app.run(d, api_host=api_host, api_port=api_port,
                                 metrics_host=m_host, metrics_port=m_port))
    except datadir.DataDirError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot listen on {listen} / {metrics_listen}: {e}") from None


def _url_host(name: str) -> str:
    return f"[{name}]" if ":" in name else name
