"""medlake.demo: demo-only code (synthetic data, the demo runner, the UI sample workspace)."""
