"""``FakeHub``: the Hugging Face Hub's network side, in memory, for tests of pushing and loading adapters."""
import fnmatch
import functools
import sys
import types
from concurrent.futures import Future
from pathlib import Path


class FakeHub:
    """Stands in for the Hub's network side: ``HfApi.create_repo`` / ``upload_folder`` store a repository's files
    (by path in the repository, subfolders included) per revision, ``snapshot_download`` hands them out as a fresh
    local snapshot folder (filtered by ``allow_patterns``), and every call is recorded (``uploads``: each upload's
    files). Uploads ``run_as_future`` (as Trainer's) are done at once. Repository-id checks, argument passing and
    everything of ours run for real."""

    class RepositoryNotFound(Exception):
        pass

    def __init__(self, root, monkeypatch):
        import huggingface_hub
        self.repos, self.calls, self.uploads, self.root = {}, [], [], root

        def allowed(name, patterns):
            return not patterns or any(fnmatch.fnmatch(name, pattern) for pattern in patterns)

        def ignored(name, patterns):
            return any(fnmatch.fnmatch(part, pattern) for part in Path(name).parts for pattern in patterns or ())

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            from huggingface_hub.hf_api import RepoUrl
            self.calls.append(("create_repo", repo_id, private, api.token))
            repo_id = repo_id if "/" in repo_id else f"me/{repo_id}"  # a bare name goes to the user's namespace
            self.repos.setdefault(repo_id, {})
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, *, branch, exist_ok=False, **kwargs):
            self.calls.append(("create_branch", repo_id, branch))
            self.repos[repo_id].setdefault(branch, dict(self.repos[repo_id].get("main", {})))

        def file_exists(api, repo_id, filename, *, revision=None, **kwargs):
            return filename in self.repos.get(repo_id, {}).get(revision or "main", {})

        def upload_folder(api, *, repo_id, folder_path, revision=None, commit_message=None, allow_patterns=None,
                          ignore_patterns=None, path_in_repo=None, run_as_future=False, **kwargs):
            self.calls.append(("upload_folder", repo_id, revision, commit_message))
            if revision is not None and revision not in self.repos[repo_id]:
                raise FakeHub.RepositoryNotFound(f"404 Client Error. Revision Not Found: {revision}")
            root = Path(folder_path)
            files = {(f"{path_in_repo}/" if path_in_repo else "") + f.relative_to(root).as_posix(): f.read_bytes()
                     for f in sorted(root.rglob("*")) if f.is_file()
                     and allowed(f.relative_to(root).as_posix(), allow_patterns)
                     and not ignored(f.relative_to(root).as_posix(), ignore_patterns)}
            self.repos[repo_id].setdefault(revision or "main", {}).update(files)
            self.uploads.append((repo_id, commit_message, files))
            result = f"commit:{repo_id}@{revision or 'main'}"
            if not run_as_future:
                return result
            future = Future()
            future.set_result(result)
            return future

        def snapshot_download(repo_id, *, revision=None, token=None, allow_patterns=None, **kwargs):
            self.calls.append(("snapshot_download", repo_id, revision, token))
            if (revision or "main") not in self.repos.get(repo_id, {}):
                raise FakeHub.RepositoryNotFound(f"404 Client Error. Repository Not Found for url: {repo_id}")
            folder = self.root / f"snapshot{len(self.calls)}"
            folder.mkdir()
            for name, data in self.repos[repo_id][revision or "main"].items():
                if allowed(name, allow_patterns):
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_bytes(data)
            return str(folder)

        fakes = {"create_repo": create_repo, "create_branch": create_branch, "file_exists": file_exists,
                 "upload_folder": upload_folder}
        for name, fake in fakes.items():
            monkeypatch.setattr(huggingface_hub.HfApi, name, fake)
        # huggingface_hub's module-level create_repo, upload_folder, ... are methods bound to one HfApi when it was
        # imported, and so is whatever imported them by name (transformers 4.x's Trainer): those, too. Read with
        # vars(), not getattr: transformers' lazy modules import on a missing attribute.
        modules = [m for n, m in list(sys.modules.items())
                   if m is not None and (n == "huggingface_hub" or n == "transformers" or n.startswith("transformers."))]
        for module in modules:
            for name, fake in fakes.items():
                bound = vars(module).get(name)
                if isinstance(bound, types.MethodType) and isinstance(bound.__self__, huggingface_hub.HfApi):
                    monkeypatch.setattr(module, name, functools.partial(fake, bound.__self__))
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
