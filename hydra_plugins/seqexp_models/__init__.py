"""Hydra's config search path gets the config folders of seqexp's model plugins (entry point
group `seqexp.models`, seqexp/run/plugins.py), so that `seqexp model=<a plugin's model>`
composes that package's conf/model/<name>.yaml."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from seqexp.core.resources import config_dir
from seqexp.run.plugins import config_dirs


class SeqexpModelsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for folder in config_dirs():
            if folder != config_dir():
                search_path.append(provider="seqexp-models", path=f"file://{folder}")
