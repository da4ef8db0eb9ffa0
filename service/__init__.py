"""The service layer the gateway and the worker share: the job store, job folders, the queue
contract (task names), settings, webhook delivery, job links and the service's errors.

It builds on the science core's light modules and imports neither the gateway, the worker nor
the scientific stack.
"""
