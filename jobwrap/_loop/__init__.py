"""The training process's loop: the Session, its step boundary, loaders, saves in the background, resume.

Private: the public names are in :mod:`jobwrap`. Imports :mod:`jobwrap._storage`,
:mod:`jobwrap._scheduler` and :mod:`jobwrap._report`; none of them imports this package.
"""
