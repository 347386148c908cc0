"""ddrun's Hydra config tree, shipped as the package ``ddrun.conf``. Importing it registers the typed schemas of the
commands' top-level knobs (``ddrun.schema``) that the primary configs start from."""

from ddrun.schema import register

register()
