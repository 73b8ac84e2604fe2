from cachebuild.cli import cli

cli()
