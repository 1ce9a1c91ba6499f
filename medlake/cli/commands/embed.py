"""``medlake embed``: image vectors into LanceDB (incremental, resumable)."""

from __future__ import annotations

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("embed")
@click.option("--model", default=None, help="descriptor-v1 or an open_clip model name "
              "(default: params.yaml embed.model).")
@click.option("--pretrained", default=None, help="Local checkpoint file (default: params.yaml).")
@click.option("--batch-size", type=int, default=None, help="Images per batch (one LanceDB commit).")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes.")
@click.option("--limit", type=int, default=None, help="Stop after this many new images.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine; ray: a Ray Data pipeline on a cluster (medlake[scale]).")
@click.option("--address", default=None, help="Ray head HOST:PORT (default: RAY_ADDRESS).")
@workspace_option
@command
def embed(model, pretrained, batch_size, workers, limit, engine, address, workspace):
    """Embed every fingerprinted image not yet embedded with the configured model.

    Vectors go to lake/vectors (LanceDB), keyed by image id, sha256 and model; a re-run embeds
    only new or changed images, and a run killed half way keeps its finished batches.
    """
    from medlake.pipelines import embed as stage

    cat = open_catalog(workspace)
    if engine == "ray":
        from medlake.pipelines import ray_embed

        res = ray_embed.run(cat, address=address, model=model, pretrained=pretrained,
                            batch_size=batch_size, limit=limit)
    else:
        res = stage.run(cat, model=model, pretrained=pretrained, batch_size=batch_size,
                        workers=workers, limit=limit)
    skipped = "" if res["skipped"] is None else f", {res['skipped']:,} already embedded"
    click.echo(f"embed ({res['model']}): {res['embedded']:,} embedded{skipped}, "
               f"{res['unreadable']:,} unreadable" + (", ANN index built" if res["index"] else ""))


COMMANDS = [embed]
