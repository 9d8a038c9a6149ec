/* The pod sandbox's process on the real node: it holds the pod's namespaces and waits. Built
 * static by hack/real-node.sh into the pause image the node's containerd uses (no registry is
 * reachable here to pull one). */
#include <signal.h>
#include <unistd.h>

static void leave(int sig) {
    (void)sig;
    _exit(0);
}

int main(void) {
    signal(SIGTERM, leave);
    signal(SIGINT, leave);
    for (;;) {
        pause();
    }
}
