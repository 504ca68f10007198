"""A local stand-in for the Hugging Face Hub: ``create_repo``/``upload_folder`` like
``huggingface_hub.HfApi``, copying into ``root/<repo_id>`` (Spaces into ``root/spaces/<id>``).
``install(root)`` puts it in place of ``huggingface_hub.HfApi`` for code that makes its own
(``trustser push``); the wheel test runs that in a fresh environment."""

from __future__ import annotations

import shutil
from pathlib import Path


class FakeHfApi:
    """create_repo / upload_folder like huggingface_hub.HfApi, into ``root/<repo_id>``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.calls = []

    def _path(self, repo_id, repo_type):
        return self.root / ("spaces" if repo_type == "space" else "") / repo_id

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, **kw):
        self.calls.append(("create_repo", repo_id, private))
        path = self._path(repo_id, repo_type)
        if path.exists() and not exist_ok:
            raise FileExistsError(repo_id)
        path.mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None, **kw):
        self.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, self._path(repo_id, repo_type), dirs_exist_ok=True)
        return "fakecommit"


def install(root) -> None:
    """``huggingface_hub.HfApi(token=...)`` now makes a FakeHfApi on ``root``."""
    import huggingface_hub

    class LocalHub(FakeHfApi):
        def __init__(self, token=None, **kw):
            super().__init__(root)

    huggingface_hub.HfApi = LocalHub
