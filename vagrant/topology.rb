# topology.rb: the Vagrant lab's shape, the one place its names and addresses are written.
#
# The same shape as the network-namespace lab (`scripts/lab up`, agent/lab/topology.py): node N
# is "node-N" in zone "lab-<letter>" with pod subnet 10.10.N.0/24 behind it, and the demo pods
# (web, echo, client-1) alternate over the nodes the same way. Only the fabric differs: a
# VirtualBox/libvirt private network instead of the lab bridge. tests/test_vagrant.py evaluates
# this file with ruby and compares it with `agent.lab.topology.plan(..., fabric=FABRIC)`.
module NodemeshLab
  FABRIC = "192.168.56.0/24"
  CONTROLLER_IP = "192.168.56.10"
  NODES = Integer(ENV.fetch("NODEMESH_NODES", "2"))
  PODS_PER_NODE = Integer(ENV.fetch("NODEMESH_PODS_PER_NODE", "2"))

  def self.zone(number)
    letters = ""
    n = number
    while n > 0
      n, r = (n - 1).divmod(26)
      letters = ("a".ord + r).chr + letters
    end
    "lab-#{letters}"
  end

  def self.nodes
    (1..NODES).map do |n|
      { "name" => "node-#{n}", "number" => n, "address" => "192.168.56.#{10 + n}",
        "pod_cidr" => "10.10.#{n}.0/24", "zone" => zone(n) }
    end
  end

  def self.to_h
    { "fabric" => FABRIC, "controller_ip" => CONTROLLER_IP, "pods_per_node" => PODS_PER_NODE,
      "nodes" => nodes }
  end
end
