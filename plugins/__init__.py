"""Built-in segkit plugins (import package ``segkit_plugins``), each discovered through the ``segkit.plugins`` entry-point group."""
