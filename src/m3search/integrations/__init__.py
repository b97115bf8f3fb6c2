"""Framework integrations: ``m3search.integrations.langchain`` and ``m3search.integrations.llama_index``.

Each is an optional extra (``pip install 'm3search[langchain]'`` / ``'m3search[llama-index]'``) and is
imported only when its module is: importing this package imports no framework.
"""
