"""ddrun's Hydra config tree, shipped as the package ``ddrun.conf``. Importing it registers the typed schemas of the
commands' top-level knobs (``ddrun.schema``) that the primary configs start from."""

from ddrun.schema import register

register()


def config_repository():
    """Hydra's view of the config groups the commands compose from (ddrun's tree and the installed plugins', e.g.
    ``hydra/launcher``): ``.group_exists(group)``, ``.get_group_options(group, ObjectType.CONFIG)``."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path

    return ConfigRepository(config_search_path=create_config_search_path("pkg://ddrun.conf"))
