"""medcap."""
